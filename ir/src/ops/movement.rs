//! Movement ops: reshape, permute (Theano's dimshuffle), broadcast_to, slice with steps (numpy's
//! rules, negative steps included), concatenate, take along an axis, and the two scatter ops that are
//! the gradients of slice and take. `stack` and `one_hot` are compositions in the user API.
//! Reshape with one inferred dim cancels symbolic dims against each other, so `[batch,28,28]`
//! reshaped to `[-1,784]` has the type `[batch,784]`.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::Tensor;
use crate::types::{shape_str, DType, Dim, TensorType};
use ndarray::{ArrayD, Axis, IxDyn};

/// One axis of a slice, as Python's `start:stop:step`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SliceRange {
    pub start: Option<i64>,
    pub stop: Option<i64>,
    pub step: i64,
}

impl SliceRange {
    pub const FULL: SliceRange = SliceRange { start: None, stop: None, step: 1 };

    pub fn is_full(&self) -> bool {
        *self == SliceRange::FULL
    }

    /// The indices this range selects from an axis of length `n` (Python's `slice.indices`).
    pub fn indices(&self, n: usize) -> Vec<usize> {
        let n = n as i64;
        let step = self.step;
        let norm = |v: i64| if v < 0 { v + n } else { v };
        let mut out = Vec::new();
        if step > 0 {
            let start = self.start.map_or(0, |s| norm(s).clamp(0, n));
            let stop = self.stop.map_or(n, |s| norm(s).clamp(0, n));
            let mut i = start;
            while i < stop {
                out.push(i as usize);
                i += step;
            }
        } else {
            let start = self.start.map_or(n - 1, |s| norm(s).clamp(-1, n - 1));
            let stop = self.stop.map_or(-1, |s| norm(s).clamp(-1, n - 1));
            let mut i = start;
            while i > stop {
                out.push(i as usize);
                i += step;
            }
        }
        out
    }
}

impl std::fmt::Display for SliceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = |v: Option<i64>| v.map_or(String::new(), |x| x.to_string());
        write!(f, "{}:{}", o(self.start), o(self.stop))?;
        if self.step != 1 {
            write!(f, ":{}", self.step)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum MoveOp {
    /// Target shape; `None` is the one inferred dim (numpy's -1).
    Reshape(Vec<Option<Dim>>),
    Permute(Vec<usize>),
    BroadcastTo(Vec<Dim>),
    /// One range per axis.
    Slice(Vec<SliceRange>),
    /// Zeros of `shape` with the operand written where `ranges` select (the gradient of `Slice`).
    SliceGrad {
        ranges: Vec<SliceRange>,
        shape: Vec<Dim>,
    },
    Concat {
        axis: usize,
    },
    /// numpy's `take(x, indices, axis)`; operands `[x, indices]`.
    Take {
        axis: usize,
    },
    /// Scatter-add of the operand into zeros with `size` along `axis` (the gradient of `Take`);
    /// operands `[g, indices]`.
    TakeGrad {
        axis: usize,
        size: Dim,
    },
}

impl MoveOp {
    pub fn label(&self) -> String {
        match self {
            MoveOp::Reshape(s) => {
                let parts: Vec<String> = s.iter().map(|d| d.as_ref().map_or("-1".into(), |d| d.to_string())).collect();
                format!("reshape{{[{}]}}", parts.join(","))
            }
            MoveOp::Permute(p) => format!("permute{{{p:?}}}"),
            MoveOp::BroadcastTo(s) => format!("broadcast_to{{{}}}", shape_str(s)),
            MoveOp::Slice(r) => format!("slice{{[{}]}}", ranges_str(r)),
            MoveOp::SliceGrad { ranges, shape } => {
                format!("slice_grad{{[{}],{}}}", ranges_str(ranges), shape_str(shape))
            }
            MoveOp::Concat { axis } => format!("concat{{axis={axis}}}"),
            MoveOp::Take { axis } => format!("take{{axis={axis}}}"),
            MoveOp::TakeGrad { axis, size } => format!("take_grad{{axis={axis},size={size}}}"),
        }
    }
}

fn ranges_str(r: &[SliceRange]) -> String {
    r.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// The symbolic name of a product of dims, e.g. `batch*28` or `n/2` (used for inferred dims).
fn derived_dim(syms: &[std::sync::Arc<str>], num: usize, den: usize) -> Dim {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = gcd(num, den).max(1);
    let (num, den) = (num / g, den / g);
    let mut name: Vec<String> = syms.iter().map(|s| s.to_string()).collect();
    if num > 1 || name.is_empty() {
        name.push(num.to_string());
    }
    let mut s = name.join("*");
    if den > 1 {
        s = format!("{s}/{den}");
    }
    if syms.is_empty() && den == 1 {
        return Dim::Fixed(num);
    }
    Dim::sym(&s)
}

fn infer_reshape(spec: &[Option<Dim>], x: &TensorType) -> Result<TensorType, String> {
    if spec.iter().filter(|d| d.is_none()).count() > 1 {
        return Err("at most one dimension can be inferred (-1)".into());
    }
    // Split both sides into fixed products and symbolic factors; cancel the factors they share.
    let split = |dims: &mut dyn Iterator<Item = &Dim>| {
        let (mut fixed, mut syms) = (1usize, Vec::new());
        for d in dims {
            match d {
                Dim::Fixed(n) => fixed *= n,
                Dim::Sym(s) => syms.push(s.clone()),
            }
        }
        (fixed, syms)
    };
    let (fin, mut sin) = split(&mut x.shape.iter());
    let (fout, mut sout) = split(&mut spec.iter().flatten());
    let mut i = 0;
    while i < sin.len() {
        if let Some(j) = sout.iter().position(|s| *s == sin[i]) {
            sout.remove(j);
            sin.remove(i);
        } else {
            i += 1;
        }
    }
    let mut shape = Vec::with_capacity(spec.len());
    for d in spec {
        shape.push(match d {
            Some(d) => d.clone(),
            None => {
                if !sout.is_empty() {
                    return Err("cannot infer a dimension next to unmatched symbolic dims".into());
                }
                if sin.is_empty() && (fout == 0 || fin % fout != 0) {
                    return Err(format!("cannot reshape {} elements into {}", fin, spec_str(spec)));
                }
                derived_dim(&sin, fin, fout)
            }
        });
    }
    if !spec.iter().any(|d| d.is_none()) && sin.is_empty() && sout.is_empty() && fin != fout {
        return Err(format!("cannot reshape {} elements into {} elements", fin, fout));
    }
    Ok(TensorType::new(x.dtype, shape))
}

fn spec_str(spec: &[Option<Dim>]) -> String {
    let p: Vec<String> = spec.iter().map(|d| d.as_ref().map_or("-1".into(), |d| d.to_string())).collect();
    format!("[{}]", p.join(","))
}

fn slice_len(r: &SliceRange, d: &Dim) -> Result<Dim, String> {
    if r.step == 0 {
        return Err("slice step cannot be zero".into());
    }
    Ok(match d {
        Dim::Fixed(n) => Dim::Fixed(r.indices(*n).len()),
        Dim::Sym(s) if r.is_full() => Dim::Sym(s.clone()),
        Dim::Sym(s) => Dim::sym(&format!("{s}[{r}]")),
    })
}

pub fn infer(m: &MoveOp, ins: &[&TensorType]) -> Result<TensorType, String> {
    let arity = match m {
        MoveOp::Concat { .. } => ins.len().max(1),
        MoveOp::Take { .. } | MoveOp::TakeGrad { .. } => 2,
        _ => 1,
    };
    if ins.len() != arity {
        return Err(format!("expects {arity} operand(s), got {}", ins.len()));
    }
    let x = ins[0];
    match m {
        MoveOp::Reshape(spec) => infer_reshape(spec, x),
        MoveOp::Permute(p) => {
            let mut sorted = p.clone();
            sorted.sort_unstable();
            if sorted != (0..x.rank()).collect::<Vec<_>>() {
                return Err(format!("{p:?} is not a permutation of the {} axes", x.rank()));
            }
            Ok(TensorType::new(x.dtype, p.iter().map(|&i| x.shape[i].clone()).collect()))
        }
        MoveOp::BroadcastTo(target) => {
            if target.len() < x.rank() {
                return Err(format!("cannot broadcast to fewer dims {}", shape_str(target)));
            }
            let off = target.len() - x.rank();
            for (i, d) in x.shape.iter().enumerate() {
                let t = &target[off + i];
                if d != t && !d.is_one() && matches!((d, t), (Dim::Fixed(_), Dim::Fixed(_))) {
                    return Err(format!("cannot broadcast to {}", shape_str(target)));
                }
            }
            Ok(TensorType::new(x.dtype, target.clone()))
        }
        MoveOp::Slice(ranges) => {
            if ranges.len() != x.rank() {
                return Err(format!("{} ranges for rank {}", ranges.len(), x.rank()));
            }
            let shape = ranges.iter().zip(&x.shape).map(|(r, d)| slice_len(r, d)).collect::<Result<_, _>>()?;
            Ok(TensorType::new(x.dtype, shape))
        }
        MoveOp::SliceGrad { ranges, shape } => {
            let sliced = infer(&MoveOp::Slice(ranges.clone()), &[&TensorType::new(x.dtype, shape.clone())])?;
            if sliced.rank() != x.rank() {
                return Err("gradient rank does not match the slice".into());
            }
            Ok(TensorType::new(x.dtype, shape.clone()))
        }
        MoveOp::Concat { axis } => {
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            let (mut fixed, mut syms) = (0usize, Vec::new());
            for t in ins {
                if t.dtype != x.dtype || t.rank() != x.rank() {
                    return Err("operands must share dtype and rank".into());
                }
                for (i, (a, b)) in t.shape.iter().zip(&x.shape).enumerate() {
                    if i != *axis && a != b && matches!((a, b), (Dim::Fixed(_), Dim::Fixed(_))) {
                        return Err(format!("operands differ on axis {i}"));
                    }
                }
                match &t.shape[*axis] {
                    Dim::Fixed(n) => fixed += n,
                    Dim::Sym(s) => syms.push(s.to_string()),
                }
            }
            let mut shape = x.shape.clone();
            shape[*axis] = if syms.is_empty() {
                Dim::Fixed(fixed)
            } else {
                if fixed > 0 {
                    syms.push(fixed.to_string());
                }
                Dim::sym(&syms.join("+"))
            };
            Ok(TensorType::new(x.dtype, shape))
        }
        MoveOp::Take { axis } => {
            let idx = ins[1];
            if !idx.dtype.is_int() {
                return Err(format!("indices must be integers, got {}", idx.dtype));
            }
            if *axis >= x.rank() {
                return Err(format!("axis {axis} out of range for rank {}", x.rank()));
            }
            let mut shape = x.shape[..*axis].to_vec();
            shape.extend(idx.shape.iter().cloned());
            shape.extend(x.shape[axis + 1..].iter().cloned());
            Ok(TensorType::new(x.dtype, shape))
        }
        MoveOp::TakeGrad { axis, size } => {
            let idx = ins[1];
            if !idx.dtype.is_int() || x.rank() < axis + idx.rank() {
                return Err("operands do not match a take".into());
            }
            let mut shape = x.shape[..*axis].to_vec();
            shape.push(size.clone());
            shape.extend(x.shape[axis + idx.rank()..].iter().cloned());
            Ok(TensorType::new(x.dtype, shape))
        }
    }
}

fn select_axes<T: Clone>(a: &ArrayD<T>, picks: &[Vec<usize>]) -> ArrayD<T> {
    let mut out = a.clone();
    for (ax, idx) in picks.iter().enumerate() {
        if idx.len() != out.shape()[ax] || idx.iter().enumerate().any(|(i, &j)| i != j) {
            out = out.select(Axis(ax), idx);
        }
    }
    out
}

fn concat_arrays<T: Clone>(arrs: Vec<&ArrayD<T>>, axis: usize) -> Result<ArrayD<T>, String> {
    let views: Vec<_> = arrs.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(axis), &views).map_err(|e| e.to_string())
}

fn normalize_indices(idx: &Tensor, n: usize) -> Result<Vec<usize>, String> {
    idx.to_i64_vec()
        .into_iter()
        .map(|i| {
            let j = if i < 0 { i + n as i64 } else { i };
            if j < 0 || j >= n as i64 {
                Err(format!("index {i} out of range for an axis of size {n}"))
            } else {
                Ok(j as usize)
            }
        })
        .collect()
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

pub fn eval(m: &MoveOp, ins: &[&Tensor], out: &TensorType) -> Result<Tensor, String> {
    let x = ins[0];
    let oshape = out.concrete().ok_or("output shape is not concrete")?;
    match m {
        MoveOp::Reshape(_) => {
            x.clone().into_shape(&oshape).ok_or_else(|| format!("cannot reshape {:?} into {oshape:?}", x.shape()))
        }
        MoveOp::Permute(p) => {
            Ok(crate::map_array!(x, a => a.view().permuted_axes(p.clone()).as_standard_layout().into_owned()))
        }
        MoveOp::BroadcastTo(_) => {
            let r: Option<Tensor> = (|| Some(crate::map_array!(x, a => a.broadcast(IxDyn(&oshape))?.to_owned())))();
            r.ok_or_else(|| format!("cannot broadcast {:?} to {oshape:?}", x.shape()))
        }
        MoveOp::Slice(ranges) => {
            let picks: Vec<Vec<usize>> = ranges.iter().zip(x.shape()).map(|(r, &n)| r.indices(n)).collect();
            Ok(crate::map_array!(x, a => select_axes(a, &picks)))
        }
        MoveOp::SliceGrad { ranges, .. } => {
            let picks: Vec<Vec<usize>> = ranges.iter().zip(&oshape).map(|(r, &n)| r.indices(n)).collect();
            if picks.iter().map(|p| p.len()).collect::<Vec<_>>() != x.shape() {
                return Err(format!("gradient of shape {:?} does not match the slice", x.shape()));
            }
            let (gs, os) = (strides(x.shape()), strides(&oshape));
            let mut res = vec![0.0; oshape.iter().product()];
            for (flat, v) in x.to_f64_vec().into_iter().enumerate() {
                let mut o = 0;
                for ax in 0..gs.len() {
                    o += picks[ax][(flat / gs[ax]) % x.shape()[ax]] * os[ax];
                }
                res[o] += v;
            }
            Ok(Tensor::from_f64(x.dtype(), &oshape, &res))
        }
        MoveOp::Concat { axis } => {
            macro_rules! cat {
                ($v:ident) => {{
                    let arrs: Option<Vec<_>> =
                        ins.iter().map(|t| if let Tensor::$v(a) = t { Some(a) } else { None }).collect();
                    Tensor::$v(concat_arrays(arrs.ok_or("operand dtypes differ")?, *axis)?)
                }};
            }
            Ok(match x.dtype() {
                DType::F32 => cat!(F32),
                DType::F64 => cat!(F64),
                DType::I32 => cat!(I32),
                DType::I64 => cat!(I64),
                DType::Bool => cat!(Bool),
            })
        }
        MoveOp::Take { axis } => {
            let idx = normalize_indices(ins[1], x.shape()[*axis])?;
            let picked = crate::map_array!(x, a => a.select(Axis(*axis), &idx));
            picked.into_shape(&oshape).ok_or_else(|| "take: result shape mismatch".to_string())
        }
        MoveOp::TakeGrad { axis, .. } => {
            let n = oshape[*axis];
            let idx = normalize_indices(ins[1], n)?;
            let outer: usize = oshape[..*axis].iter().product();
            let inner: usize = oshape[axis + 1..].iter().product();
            let g = x.to_f64_vec();
            let mut res = vec![0.0; oshape.iter().product()];
            for o in 0..outer {
                for (k, &j) in idx.iter().enumerate() {
                    let src = (o * idx.len() + k) * inner;
                    let dst = (o * n + j) * inner;
                    for e in 0..inner {
                        res[dst + e] += g[src + e];
                    }
                }
            }
            Ok(Tensor::from_f64(x.dtype(), &oshape, &res))
        }
    }
}

pub fn vjp(m: &MoveOp, gr: &mut Graph, node: NodeId, g: NodeId) -> Result<Vec<Option<NodeId>>> {
    let ins = gr.inputs(node).to_vec();
    let at = gr.node(node).at;
    let x = ins[0];
    if !gr.ty(node).dtype.is_float() {
        return Ok(vec![None; ins.len()]);
    }
    let xshape = gr.ty(x).shape.clone();
    Ok(match m {
        MoveOp::Reshape(_) => vec![Some(gr.reshape_to(g, &xshape, at)?)],
        MoveOp::Permute(p) => {
            let mut inv = vec![0; p.len()];
            for (i, &j) in p.iter().enumerate() {
                inv[j] = i;
            }
            vec![Some(gr.permute(g, inv, at)?)]
        }
        MoveOp::BroadcastTo(_) => vec![Some(gr.sum_to(g, &xshape, at)?)],
        MoveOp::Slice(ranges) => {
            vec![Some(gr.movement(MoveOp::SliceGrad { ranges: ranges.clone(), shape: xshape }, &[g], at)?)]
        }
        MoveOp::SliceGrad { ranges, .. } => vec![Some(gr.movement(MoveOp::Slice(ranges.clone()), &[g], at)?)],
        MoveOp::Concat { axis } => {
            let mut start = 0i64;
            let mut grads = Vec::new();
            for &i in &ins {
                let Dim::Fixed(n) = gr.ty(i).shape[*axis] else {
                    return Err(crate::Error::Grad {
                        detail: format!(
                            "{}: the gradient of concatenate needs fixed sizes along axis {axis}, got {}",
                            crate::error::At(at),
                            gr.ty(i)
                        ),
                    });
                };
                let mut ranges = vec![SliceRange::FULL; xshape.len()];
                ranges[*axis] = SliceRange { start: Some(start), stop: Some(start + n as i64), step: 1 };
                start += n as i64;
                grads.push(Some(gr.movement(MoveOp::Slice(ranges), &[g], at)?));
            }
            grads
        }
        MoveOp::Take { axis } => {
            let size = xshape[*axis].clone();
            vec![Some(gr.movement(MoveOp::TakeGrad { axis: *axis, size }, &[g, ins[1]], at)?), None]
        }
        MoveOp::TakeGrad { axis, .. } => vec![Some(gr.movement(MoveOp::Take { axis: *axis }, &[g, ins[1]], at)?), None],
    })
}
