//! Reductions over any set of axes, with keepdims: sum, mean, max, min, prod, argmax; and `SizeOf`,
//! the element count over axes that divides a mean (a node, so symbolic sizes work). The reference
//! semantics move the reduced axes last and fold each row, accumulating in f64 for every dtype.
//! `argmax` over several axes indexes their flattened (row-major) product, and returns i64. max, min
//! and argmax propagate NaN as numpy does.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    ArgMax,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Prod => "prod",
            ReduceOp::ArgMax => "argmax",
        }
    }
    pub const ALL: [ReduceOp; 6] =
        [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod, ReduceOp::ArgMax];

    /// The reduction of one row of values.
    pub fn fold(self, row: &[f64]) -> f64 {
        let nan_first = || row.iter().position(|v| v.is_nan());
        match self {
            ReduceOp::Sum => row.iter().sum(),
            ReduceOp::Mean => row.iter().sum::<f64>() / row.len() as f64,
            ReduceOp::Prod => row.iter().product(),
            ReduceOp::Max => {
                nan_first().map_or_else(|| row.iter().copied().fold(f64::NEG_INFINITY, f64::max), |_| f64::NAN)
            }
            ReduceOp::Min => {
                nan_first().map_or_else(|| row.iter().copied().fold(f64::INFINITY, f64::min), |_| f64::NAN)
            }
            ReduceOp::ArgMax => nan_first().unwrap_or_else(|| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best
            }) as f64,
        }
    }
}

fn check_axes(axes: &[usize], rank: usize) -> Result<(), String> {
    if let Some(&a) = axes.iter().find(|&&a| a >= rank) {
        return Err(format!("axis {a} out of range for rank {rank}"));
    }
    if axes.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("axes {axes:?} must be sorted and unique"));
    }
    Ok(())
}

/// The shape after reducing `axes` (kept as 1 with keepdims).
pub fn reduced_shape(shape: &[Dim], axes: &[usize], keepdims: bool) -> Vec<Dim> {
    let mut out = Vec::new();
    for (i, d) in shape.iter().enumerate() {
        if axes.contains(&i) {
            if keepdims {
                out.push(Dim::Fixed(1));
            }
        } else {
            out.push(d.clone());
        }
    }
    out
}

pub fn infer(op: ReduceOp, axes: &[usize], keepdims: bool, x: &TensorType) -> Result<TensorType, String> {
    check_axes(axes, x.rank())?;
    let dtype = match op {
        ReduceOp::ArgMax => DType::I64,
        ReduceOp::Mean if !x.dtype.is_float() => return Err(format!("mean needs a float dtype, got {}", x.dtype)),
        _ if x.dtype == DType::Bool => return Err("cannot reduce bool; cast it first".into()),
        _ => x.dtype,
    };
    if op == ReduceOp::ArgMax && axes.is_empty() {
        return Err("argmax needs at least one axis".into());
    }
    Ok(TensorType::new(dtype, reduced_shape(&x.shape, axes, keepdims)))
}

pub fn infer_size_of(axes: &[usize], dtype: DType, x: &TensorType) -> Result<TensorType, String> {
    check_axes(axes, x.rank())?;
    if !dtype.is_float() {
        return Err(format!("size_of yields a float dtype, asked for {dtype}"));
    }
    Ok(TensorType::scalar(dtype))
}

pub fn eval_size_of(axes: &[usize], dtype: DType, x: &Tensor) -> Result<Tensor, String> {
    let n: usize = axes.iter().map(|&a| x.shape()[a]).product();
    Ok(Tensor::scalar(dtype, n as f64))
}

pub fn eval(op: ReduceOp, axes: &[usize], _keepdims: bool, x: &Tensor, out: &TensorType) -> Result<Tensor, String> {
    let shape = x.shape().to_vec();
    let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
    let inner: usize = axes.iter().map(|&a| shape[a]).product();
    let outer: usize = kept.iter().map(|&a| shape[a]).product();
    if inner == 0 && matches!(op, ReduceOp::ArgMax | ReduceOp::Max | ReduceOp::Min) {
        return Err(format!("{} of an empty axis", op.name()));
    }
    let perm: Vec<usize> = kept.iter().chain(axes).copied().collect();
    let vals = crate::with_array!(x, a => a.view().permuted_axes(perm.clone()).iter().map(|&v| crate::ops::Scalar::from(v).as_f64()).collect::<Vec<f64>>());
    let res: Vec<f64> = (0..outer).map(|r| op.fold(&vals[r * inner..(r + 1) * inner])).collect();
    let oshape = out.concrete().ok_or("output shape is not concrete")?;
    Ok(Tensor::from_f64(out.dtype, &oshape, &res))
}

pub fn vjp(
    op: ReduceOp,
    axes: &[usize],
    keepdims: bool,
    gr: &mut Graph,
    node: NodeId,
    g: NodeId,
) -> Result<Vec<Option<NodeId>>> {
    let x = gr.inputs(node)[0];
    let at = gr.node(node).at;
    if op == ReduceOp::ArgMax || !gr.ty(x).dtype.is_float() {
        return Ok(vec![None]);
    }
    let xshape = gr.ty(x).shape.clone();
    let keep_shape = reduced_shape(&xshape, axes, true);
    let g_keep = if keepdims { g } else { gr.reshape_to(g, &keep_shape, at)? };
    let g_full = gr.broadcast_to(g_keep, &xshape, at)?;
    let dx = match op {
        ReduceOp::Sum => g_full,
        ReduceOp::Mean => {
            let dtype = gr.ty(x).dtype;
            let n = gr.add(crate::ops::Op::SizeOf { axes: axes.to_vec(), dtype }, &[x], at)?;
            gr.div2(g_full, n, at)?
        }
        // The gradient reaches every element equal to the extremum (Theano's rule).
        ReduceOp::Max | ReduceOp::Min => {
            let y_keep = if keepdims { node } else { gr.reshape_to(node, &keep_shape, at)? };
            let hit = gr.binary(crate::ops::BinaryOp::Eq, x, y_keep, at)?;
            let zero = gr.scalar_like(x, 0.0, at);
            gr.where_(hit, g_full, zero, at)?
        }
        // d prod / dx_i = prod / x_i (for nonzero x_i)
        ReduceOp::Prod => {
            let y_keep = if keepdims { node } else { gr.reshape_to(node, &keep_shape, at)? };
            let t = gr.div2(y_keep, x, at)?;
            gr.mul2(g_full, t, at)?
        }
        ReduceOp::ArgMax => unreachable!("handled above"),
    };
    Ok(vec![Some(dx)])
}
