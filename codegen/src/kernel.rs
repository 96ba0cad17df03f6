//! The kernel program: the one lowering shared by the native backends. A specialized graph (every
//! shape concrete) becomes a list of buffers and a list of steps. Most steps are *loop kernels*: an
//! iteration space, strided views of input buffers (stride 0 broadcasts, negative strides reverse),
//! a scalar expression DAG, and an output view, optionally reducing the innermost dims. Elementwise
//! and fused nodes, reductions, permutes, broadcasts, slices, concatenations and slice gradients are
//! loop kernels; softmax, log-softmax and softmax cross-entropy are short sequences of them. Matrix
//! products, gathers, scatters and random numbers are their own steps. Nothing here is specific to
//! a code generator. Every view is checked against its buffer's bounds here, once, so generated
//! code never needs to check.

use kiln_ir::ops::fused::ScalarExpr;
use kiln_ir::ops::{MoveOp, NnOp, Op, RandomOp, ReduceOp, Scalar, SliceRange, SourceOp, UnaryOp};
use kiln_ir::{At, DType, Error, Graph, Loc, NodeId, Result, Tensor};
use std::collections::HashMap;

pub type BufId = usize;

#[derive(Clone, Debug, PartialEq)]
pub enum BufKind {
    /// The k-th input of the program.
    Input(usize),
    /// The k-th shared variable of the program.
    Shared(usize),
    Constant(Tensor),
    /// Written by a step.
    Temp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub dtype: DType,
    pub len: usize,
    pub kind: BufKind,
}

/// Elements of `buf` at `offset + sum(i_d * strides[d])` (in elements).
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub buf: BufId,
    pub offset: isize,
    pub strides: Vec<isize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoopKernel {
    /// Stable name: `k{step}_{what}`.
    pub name: String,
    /// The graph nodes (op and user call site) this kernel computes.
    pub origin: Vec<String>,
    /// The iteration space; with a reduction, its last `reduce.1` dims are reduced.
    pub shape: Vec<usize>,
    pub inputs: Vec<View>,
    pub input_dtypes: Vec<DType>,
    pub exprs: Vec<ScalarExpr>,
    /// The output; its strides cover the kept dims only when reducing.
    pub out: View,
    pub out_dtype: DType,
    /// (op, number of trailing reduced dims).
    pub reduce: Option<(ReduceOp, usize)>,
}

/// `c[b] = a[b] @ b[b]` for each batch item, operands row-major contiguous with batch strides (0
/// broadcasts an operand over the batch). A transposed operand is read from the buffer of the
/// matrix it transposes (strides swapped), so transposes feeding a product cost no copy.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMul {
    pub name: String,
    pub origin: Vec<String>,
    pub dtype: DType,
    pub a: BufId,
    pub b: BufId,
    pub c: BufId,
    /// `a` holds each batch item as `[k, m]` (so it is read transposed).
    pub a_transposed: bool,
    /// `b` holds each batch item as `[n, k]`.
    pub b_transposed: bool,
    pub batch: usize,
    pub a_batch_stride: usize,
    pub b_batch_stride: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// An elementwise kernel over `c` (bias, activation, an update...) run right after the product,
    /// on each row block by the core that computed it; only for single products (no batch).
    pub epilogue: Option<Box<LoopKernel>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Loop(LoopKernel),
    MatMul(MatMul),
    /// numpy take: `out[o, j, i] = x[o, idx[j], i]` with `outer`, `idx.len()`, `inner` and the axis size.
    Gather {
        x: BufId,
        idx: BufId,
        out: BufId,
        outer: usize,
        axis_len: usize,
        inner: usize,
        dtype: DType,
        at: Loc,
    },
    /// The gradient of take: zeros, then `out[o, idx[j], i] += g[o, j, i]`.
    ScatterAdd {
        g: BufId,
        idx: BufId,
        out: BufId,
        outer: usize,
        axis_len: usize,
        inner: usize,
        dtype: DType,
        at: Loc,
    },
    /// Random numbers of a random node, from the state buffer (see kiln-ir's random module).
    Random {
        op: RandomOp,
        state: BufId,
        out: BufId,
        len: usize,
    },
}

#[derive(Clone, Debug)]
pub struct KernelProgram {
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    pub outputs: Vec<BufId>,
}

fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut s = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as isize;
    }
    s
}

/// A view of a contiguous buffer of shape `shape` broadcast (right-aligned) to `target`.
fn broadcast_view(buf: BufId, shape: &[usize], target: &[usize]) -> View {
    let base = contiguous_strides(shape);
    let lead = target.len() - shape.len();
    let strides = (0..target.len())
        .map(|d| if d < lead || (shape[d - lead] == 1 && target[d] != 1) { 0 } else { base[d - lead] })
        .collect();
    View { buf, offset: 0, strides }
}

struct Lowering<'g> {
    g: &'g Graph,
    prog: KernelProgram,
    buf_of: HashMap<NodeId, BufId>,
    /// Transposes of the last two axes read only by matrix products: node -> the node it transposes.
    transposed_only: HashMap<NodeId, NodeId>,
    /// Steps named so far (names stay unique when a kernel moves into a product as its epilogue).
    named: usize,
}

impl<'g> Lowering<'g> {
    fn shape(&self, n: NodeId) -> Vec<usize> {
        self.g.ty(n).concrete().expect("specialized graph")
    }
    fn temp(&mut self, dtype: DType, len: usize) -> BufId {
        self.prog.buffers.push(Buffer { dtype, len, kind: BufKind::Temp });
        self.prog.buffers.len() - 1
    }
    fn origin(&self, n: NodeId) -> Vec<String> {
        let node = self.g.node(n);
        vec![format!("{} @ {}", node.op.label(), At(node.at))]
    }
    fn name(&mut self, what: &str) -> String {
        let clean: String = what.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        self.named += 1;
        format!("k{}_{}", self.named - 1, clean)
    }
    fn push_loop(&mut self, n: NodeId, what: &str, k: LoopKernelParts) {
        let kernel = LoopKernel {
            name: self.name(what),
            origin: self.origin(n),
            shape: k.shape,
            input_dtypes: k.inputs.iter().map(|v| self.prog.buffers[v.buf].dtype).collect(),
            inputs: k.inputs,
            exprs: k.exprs,
            out_dtype: self.prog.buffers[k.out.buf].dtype,
            out: k.out,
            reduce: k.reduce,
        };
        self.prog.steps.push(Step::Loop(kernel));
    }

    /// An elementwise kernel of `exprs` over operands broadcast to `shape`, into a new buffer.
    fn elementwise(
        &mut self,
        n: NodeId,
        what: &str,
        operands: &[NodeId],
        exprs: Vec<ScalarExpr>,
        dtype: DType,
        shape: &[usize],
    ) -> BufId {
        let out = self.temp(dtype, shape.iter().product());
        let inputs = operands.iter().map(|&o| broadcast_view(self.buf_of[&o], &self.shape(o), shape)).collect();
        let out_view = View { buf: out, offset: 0, strides: contiguous_strides(shape) };
        self.push_loop(n, what, LoopKernelParts { shape: shape.to_vec(), inputs, exprs, out: out_view, reduce: None });
        out
    }

    /// A reduction over `axes` of `exprs` applied to `operands` (broadcast to `shape`).
    #[allow(clippy::too_many_arguments)]
    fn reduction(
        &mut self,
        n: NodeId,
        what: &str,
        operands: &[(BufId, Vec<usize>)],
        exprs: Vec<ScalarExpr>,
        shape: &[usize],
        op: ReduceOp,
        axes: &[usize],
        dtype: DType,
    ) -> BufId {
        let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
        let order: Vec<usize> = kept.iter().chain(axes).copied().collect();
        let out_shape: Vec<usize> = kept.iter().map(|&a| shape[a]).collect();
        let out = self.temp(dtype, out_shape.iter().product());
        let inputs = operands
            .iter()
            .map(|(b, s)| {
                let v = broadcast_view(*b, s, shape);
                View { buf: v.buf, offset: 0, strides: order.iter().map(|&a| v.strides[a]).collect() }
            })
            .collect();
        let out_view = View { buf: out, offset: 0, strides: contiguous_strides(&out_shape) };
        let it: Vec<usize> = order.iter().map(|&a| shape[a]).collect();
        self.push_loop(
            n,
            what,
            LoopKernelParts { shape: it, inputs, exprs, out: out_view, reduce: Some((op, axes.len())) },
        );
        out
    }

    /// Copies a strided view of `src` (iterating `shape`) into `out` at the given view.
    fn copy(&mut self, n: NodeId, what: &str, src: View, out: View, shape: &[usize]) {
        let exprs = vec![ScalarExpr::Input(0)];
        self.push_loop(n, what, LoopKernelParts { shape: shape.to_vec(), inputs: vec![src], exprs, out, reduce: None });
    }

    /// Moves the loop kernel just pushed for node `n` into the product that only `n` reads, when the
    /// product is a single matrix of `n`'s shape and every other operand is ready by then.
    fn attach_epilogue(&mut self, n: NodeId) {
        let g = self.g;
        let is_sole_product = |i: NodeId| {
            *g.op(i) == Op::MatMul
                && g.users(i) == [n]
                && !g.outputs().contains(&i)
                && g.ty(i).rank() == 2
                && g.ty(i).shape == g.ty(n).shape
        };
        let Some(&product) = g.inputs(n).iter().find(|&&i| is_sole_product(i)) else { return };
        let c = self.buf_of[&product];
        let Some(mm) = self.prog.steps.iter().rposition(|s| matches!(s, Step::MatMul(m) if m.c == c)) else { return };
        let last = self.prog.steps.len() - 1;
        let Step::Loop(k) = &self.prog.steps[last] else { return };
        let written_between = |b: BufId| (mm + 1..last).any(|i| step_writes(&self.prog.steps[i]).contains(&b));
        if k.inputs.iter().any(|v| written_between(v.buf)) {
            return;
        }
        let Some(Step::Loop(k)) = self.prog.steps.pop() else { unreachable!("checked above") };
        if let Step::MatMul(m) = &mut self.prog.steps[mm] {
            m.epilogue = Some(Box::new(k));
        }
    }

    fn lower_node(&mut self, n: NodeId) -> Result<()> {
        let g = self.g;
        let node = g.node(n);
        let shape = self.shape(n);
        let dtype = node.ty.dtype;
        let ins = node.inputs.clone();
        let buf = match &node.op {
            Op::Source(SourceOp::Constant(t)) => {
                self.prog.buffers.push(Buffer { dtype, len: t.len(), kind: BufKind::Constant((**t).clone()) });
                self.prog.buffers.len() - 1
            }
            Op::Source(_) => return Ok(()), // bound by `lower`
            Op::SizeOf { axes, dtype } => {
                let s = self.shape(ins[0]);
                let v = Tensor::scalar(*dtype, axes.iter().map(|&a| s[a]).product::<usize>() as f64);
                self.prog.buffers.push(Buffer { dtype: *dtype, len: 1, kind: BufKind::Constant(v) });
                self.prog.buffers.len() - 1
            }
            Op::Unary(u) => self.elementwise(
                n,
                &u.name(),
                &ins,
                vec![ScalarExpr::Input(0), ScalarExpr::Unary(*u, 0)],
                dtype,
                &shape,
            ),
            Op::Binary(b) => self.elementwise(
                n,
                b.name(),
                &ins,
                vec![ScalarExpr::Input(0), ScalarExpr::Input(1), ScalarExpr::Binary(*b, 0, 1)],
                dtype,
                &shape,
            ),
            Op::Where => {
                let e =
                    vec![ScalarExpr::Input(0), ScalarExpr::Input(1), ScalarExpr::Input(2), ScalarExpr::Where(0, 1, 2)];
                self.elementwise(n, "where", &ins, e, dtype, &shape)
            }
            Op::Fused(k) => match &k.reduce {
                None => self.elementwise(n, "fused", &ins, k.exprs.clone(), dtype, &shape),
                Some((op, axes, _)) => {
                    let ops: Vec<(BufId, Vec<usize>)> = ins.iter().map(|&i| (self.buf_of[&i], self.shape(i))).collect();
                    let mut eshape = vec![];
                    for (_, s) in &ops {
                        eshape = broadcast(&eshape, s);
                    }
                    self.reduction(n, &format!("fused_{}", op.name()), &ops, k.exprs.clone(), &eshape, *op, axes, dtype)
                }
            },
            Op::Reduce { op, axes, .. } => {
                let s = self.shape(ins[0]);
                let b = self.buf_of[&ins[0]];
                self.reduction(n, op.name(), &[(b, s.clone())], vec![ScalarExpr::Input(0)], &s, *op, axes, dtype)
            }
            Op::MatMul => self.matmul(n, &ins, &shape, dtype)?,
            Op::Movement(m) => self.movement(n, m, &ins, &shape, dtype)?,
            Op::Nn(op) => self.nn(n, *op, &ins, dtype)?,
            Op::Random(r) => {
                let out = self.temp(dtype, shape.iter().product());
                let len = shape.iter().product();
                self.prog.steps.push(Step::Random { op: r.clone(), state: self.buf_of[&ins[0]], out, len });
                out
            }
        };
        self.buf_of.insert(n, buf);
        let elementwise = node.op.is_elementwise() || matches!(&node.op, Op::Fused(k) if k.reduce.is_none());
        if elementwise {
            self.attach_epilogue(n);
        }
        Ok(())
    }

    fn matmul(&mut self, n: NodeId, ins: &[NodeId], shape: &[usize], dtype: DType) -> Result<BufId> {
        let (sa, sb) = (self.shape(ins[0]), self.shape(ins[1]));
        let r = shape.len();
        let (m, n_, k) = (shape[r - 2], shape[r - 1], sa[sa.len() - 1]);
        let batch_shape = &shape[..r - 2];
        let batch: usize = batch_shape.iter().product();
        // Operands whose batch dims are broadcast (not just missing) are materialized first.
        let operand = |me: &mut Self, i: NodeId, s: &[usize], rows: usize, cols: usize| -> (BufId, usize) {
            let own: usize = s[..s.len() - 2].iter().product();
            let b = me.buf_of[&i];
            if own == batch {
                (b, rows * cols)
            } else if own == 1 {
                (b, 0)
            } else {
                let mut full = batch_shape.to_vec();
                full.extend([rows, cols]);
                let out = me.temp(dtype, full.iter().product());
                let src = broadcast_view(b, s, &full);
                let dst = View { buf: out, offset: 0, strides: contiguous_strides(&full) };
                me.copy(n, "matmul_operand", src, dst, &full);
                (out, rows * cols)
            }
        };
        // A transpose that only feeds products is not materialized: its source is read transposed.
        let (a, a_stride, a_transposed) = match self.transposed_only.get(&ins[0]).copied() {
            Some(src) => self.transposed_operand(src, batch, m * k),
            None => {
                let (b, s) = operand(self, ins[0], &sa, m, k);
                (b, s, false)
            }
        };
        let (b, b_stride, b_transposed) = match self.transposed_only.get(&ins[1]).copied() {
            Some(src) => self.transposed_operand(src, batch, k * n_),
            None => {
                let (b, s) = operand(self, ins[1], &sb, k, n_);
                (b, s, false)
            }
        };
        let c = self.temp(dtype, shape.iter().product());
        let name = self.name("matmul");
        let origin = self.origin(n);
        self.prog.steps.push(Step::MatMul(MatMul {
            name,
            origin,
            dtype,
            a,
            b,
            c,
            a_transposed,
            b_transposed,
            batch,
            a_batch_stride: a_stride,
            b_batch_stride: b_stride,
            m,
            k,
            n: n_,
            epilogue: None,
        }));
        Ok(c)
    }

    /// The source of a transposed operand: its buffer, batch stride (0 when it is one matrix for the
    /// whole batch), and the transposed flag.
    fn transposed_operand(&self, src: NodeId, batch: usize, matrix: usize) -> (BufId, usize, bool) {
        let s = self.shape(src);
        let own: usize = s[..s.len() - 2].iter().product();
        (self.buf_of[&src], if own == 1 && batch > 1 { 0 } else { matrix }, true)
    }

    fn movement(&mut self, n: NodeId, m: &MoveOp, ins: &[NodeId], shape: &[usize], dtype: DType) -> Result<BufId> {
        let x = ins[0];
        let xs = self.shape(x);
        let xb = self.buf_of[&x];
        let xstr = contiguous_strides(&xs);
        let len: usize = shape.iter().product();
        let contiguous_out = |buf| View { buf, offset: 0, strides: contiguous_strides(shape) };
        Ok(match m {
            // Buffers are contiguous, so a reshape is the same bytes.
            MoveOp::Reshape(_) => xb,
            MoveOp::Permute(p) => {
                let out = self.temp(dtype, len);
                let src = View { buf: xb, offset: 0, strides: p.iter().map(|&d| xstr[d]).collect() };
                self.copy(n, "permute", src, contiguous_out(out), shape);
                out
            }
            MoveOp::BroadcastTo(_) => {
                let out = self.temp(dtype, len);
                self.copy(n, "broadcast", broadcast_view(xb, &xs, shape), contiguous_out(out), shape);
                out
            }
            MoveOp::Slice(ranges) => {
                let out = self.temp(dtype, len);
                let src = sliced_view(xb, &xs, ranges);
                self.copy(n, "slice", src, contiguous_out(out), shape);
                out
            }
            MoveOp::SliceGrad { ranges, .. } => {
                let out = self.temp(dtype, len);
                let zero = vec![ScalarExpr::Const(Scalar::from_f64(dtype, 0.0))];
                self.push_loop(
                    n,
                    "zeros",
                    LoopKernelParts {
                        shape: shape.to_vec(),
                        inputs: vec![],
                        exprs: zero,
                        out: contiguous_out(out),
                        reduce: None,
                    },
                );
                let dst = sliced_view(out, shape, ranges);
                let src = View { buf: xb, offset: 0, strides: xstr };
                self.copy(n, "slice_grad", src, dst, &xs);
                out
            }
            MoveOp::Concat { axis } => {
                let out = self.temp(dtype, len);
                let ostr = contiguous_strides(shape);
                let mut at = 0usize;
                for &i in ins {
                    let s = self.shape(i);
                    let src = View { buf: self.buf_of[&i], offset: 0, strides: contiguous_strides(&s) };
                    let dst = View { buf: out, offset: at as isize * ostr[*axis], strides: ostr.clone() };
                    self.copy(n, "concat", src, dst, &s);
                    at += s[*axis];
                }
                out
            }
            MoveOp::Take { axis } => {
                let out = self.temp(dtype, len);
                let (outer, inner) = (xs[..*axis].iter().product(), xs[axis + 1..].iter().product());
                let idx = self.buf_of[&ins[1]];
                let at = self.g.node(n).at;
                self.prog.steps.push(Step::Gather { x: xb, idx, out, outer, axis_len: xs[*axis], inner, dtype, at });
                out
            }
            MoveOp::TakeGrad { axis, .. } => {
                let out = self.temp(dtype, len);
                let (outer, inner) = (shape[..*axis].iter().product(), shape[axis + 1..].iter().product());
                let idx = self.buf_of[&ins[1]];
                let g = xb;
                let at = self.g.node(n).at;
                self.prog.steps.push(Step::ScatterAdd { g, idx, out, outer, axis_len: shape[*axis], inner, dtype, at });
                out
            }
        })
    }

    /// Softmax family as loop kernels: m = max(x), s = sum(exp(x - m)), then the result.
    fn nn(&mut self, n: NodeId, op: NnOp, ins: &[NodeId], dtype: DType) -> Result<BufId> {
        use ScalarExpr::*;
        let x = ins[0];
        let xs = self.shape(x);
        let xb = self.buf_of[&x];
        let axis = match op {
            NnOp::Softmax { axis } | NnOp::LogSoftmax { axis } | NnOp::SoftmaxCrossEntropy { axis } => axis,
        };
        let mut keep = xs.clone();
        keep[axis] = 1;
        let m = self.reduction(n, "row_max", &[(xb, xs.clone())], vec![Input(0)], &xs, ReduceOp::Max, &[axis], dtype);
        // An all -inf row has max -inf; subtract 0 there instead (as the reference does).
        let inf = Const(Scalar::from_f64(dtype, f64::INFINITY));
        let zero = Const(Scalar::from_f64(dtype, 0.0));
        let shifted = |x: usize, m: usize| {
            vec![
                Input(x),
                Input(m),
                Unary(UnaryOp::Abs, 1),
                inf,
                kiln_ir::ops::fused::ScalarExpr::Binary(kiln_ir::ops::BinaryOp::Lt, 2, 3),
                zero,
                Where(4, 1, 5),
                Binary(kiln_ir::ops::BinaryOp::Sub, 0, 6),
            ]
        };
        let mut sum_exprs = shifted(0, 1);
        sum_exprs.push(Unary(UnaryOp::Exp, 7));
        let s = self.reduction(
            n,
            "row_sumexp",
            &[(xb, xs.clone()), (m, keep.clone())],
            sum_exprs,
            &xs,
            ReduceOp::Sum,
            &[axis],
            dtype,
        );
        // x, m and a per-row value (s or log s), each broadcast to x's shape
        let views = |row: BufId| -> Vec<View> {
            vec![broadcast_view(xb, &xs, &xs), broadcast_view(m, &keep, &xs), broadcast_view(row, &keep, &xs)]
        };
        use kiln_ir::ops::BinaryOp as B;
        let out_len: usize = xs.iter().product();
        if let NnOp::Softmax { .. } = op {
            // softmax = exp(x - m) / s
            let mut exprs = shifted(0, 1);
            exprs.extend([Unary(UnaryOp::Exp, 7), Input(2), Binary(B::Div, 8, 9)]);
            let out = self.temp(dtype, out_len);
            let out_view = View { buf: out, offset: 0, strides: contiguous_strides(&xs) };
            let inputs = views(s);
            self.push_loop(
                n,
                "softmax",
                LoopKernelParts { shape: xs.clone(), inputs, exprs, out: out_view, reduce: None },
            );
            return Ok(out);
        }
        // log(s) once per row, then log_softmax = (x - m) - log(s)
        let log_s = self.temp(dtype, keep.iter().product());
        let row_view = View { buf: s, offset: 0, strides: contiguous_strides(&keep) };
        let log_view = View { buf: log_s, offset: 0, strides: contiguous_strides(&keep) };
        let exprs = vec![Input(0), Unary(UnaryOp::Log, 0)];
        self.push_loop(
            n,
            "row_log",
            LoopKernelParts { shape: keep.clone(), inputs: vec![row_view], exprs, out: log_view, reduce: None },
        );
        let mut ls = shifted(0, 1);
        ls.extend([Input(2), Binary(B::Sub, 7, 8)]);
        Ok(match op {
            NnOp::LogSoftmax { .. } => {
                let out = self.temp(dtype, out_len);
                let out_view = View { buf: out, offset: 0, strides: contiguous_strides(&xs) };
                let inputs = views(log_s);
                self.push_loop(
                    n,
                    "log_softmax",
                    LoopKernelParts { shape: xs.clone(), inputs, exprs: ls, out: out_view, reduce: None },
                );
                out
            }
            _ => {
                // loss = -sum(t * log_softmax), skipping t == 0 (so 0 * -inf is 0, as the reference)
                let t = ins[1];
                let ts = self.shape(t);
                let mut exprs = ls;
                exprs.extend([
                    Input(3),
                    Binary(B::Mul, 10, 9),
                    zero,
                    Binary(B::Eq, 10, 12),
                    Where(13, 12, 11),
                    Unary(UnaryOp::Neg, 14),
                ]);
                let tb = self.buf_of[&t];
                let ops: Vec<(BufId, Vec<usize>)> =
                    vec![(xb, xs.clone()), (m, keep.clone()), (log_s, keep.clone()), (tb, ts)];
                self.reduction(n, "softmax_cross_entropy", &ops, exprs, &xs, ReduceOp::Sum, &[axis], dtype)
            }
        })
    }
}

struct LoopKernelParts {
    shape: Vec<usize>,
    inputs: Vec<View>,
    exprs: Vec<ScalarExpr>,
    out: View,
    reduce: Option<(ReduceOp, usize)>,
}

fn broadcast(a: &[usize], b: &[usize]) -> Vec<usize> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let x = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
            let y = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
            x.max(y)
        })
        .collect()
}

/// The view of a slice of a contiguous buffer of shape `shape`.
fn sliced_view(buf: BufId, shape: &[usize], ranges: &[SliceRange]) -> View {
    let base = contiguous_strides(shape);
    let mut offset = 0isize;
    let mut strides = Vec::with_capacity(shape.len());
    for (d, r) in ranges.iter().enumerate() {
        let idx = r.indices(shape[d]);
        if let Some(&first) = idx.first() {
            offset += first as isize * base[d];
        }
        strides.push(base[d] * r.step as isize);
    }
    View { buf, offset, strides }
}

/// Lowers a specialized program graph. `sources` lists the Input then Shared nodes in call order.
pub fn lower(g: &Graph, inputs: &[NodeId], shared: &[NodeId]) -> Result<KernelProgram> {
    let mut transposed_only = HashMap::new();
    for n in g.topo_order(g.outputs()) {
        if let Op::Movement(MoveOp::Permute(p)) = g.op(n) {
            let r = p.len();
            let swaps_last_two =
                r >= 2 && p[..r - 2].iter().enumerate().all(|(i, &j)| i == j) && p[r - 2] == r - 1 && p[r - 1] == r - 2;
            let users = g.users(n);
            let only_products =
                !users.is_empty() && !g.outputs().contains(&n) && users.iter().all(|&u| *g.op(u) == Op::MatMul);
            // A batch of transposes broadcast against a larger batch would need a copy anyway.
            let own = &g.ty(n).shape[..r.saturating_sub(2)];
            let batch_ok = users.iter().all(|&u| {
                let t = g.ty(u);
                t.rank() == r && (t.shape[..r - 2] == *own || own.iter().all(|d| d.is_one()))
            });
            if swaps_last_two && only_products && batch_ok {
                transposed_only.insert(n, g.inputs(n)[0]);
            }
        }
    }
    let mut l = Lowering {
        g,
        prog: KernelProgram { buffers: vec![], steps: vec![], outputs: vec![] },
        buf_of: HashMap::new(),
        transposed_only,
        named: 0,
    };
    for (k, &n) in inputs.iter().enumerate() {
        let len = l.shape(n).iter().product();
        l.prog.buffers.push(Buffer { dtype: g.ty(n).dtype, len, kind: BufKind::Input(k) });
        l.buf_of.insert(n, l.prog.buffers.len() - 1);
    }
    for (k, &n) in shared.iter().enumerate() {
        let len = l.shape(n).iter().product();
        l.prog.buffers.push(Buffer { dtype: g.ty(n).dtype, len, kind: BufKind::Shared(k) });
        l.buf_of.insert(n, l.prog.buffers.len() - 1);
    }
    for n in g.topo_order(g.outputs()) {
        if !l.buf_of.contains_key(&n) && !l.transposed_only.contains_key(&n) {
            l.lower_node(n)?;
        }
    }
    l.prog.outputs = g.outputs().iter().map(|o| l.buf_of[o]).collect();
    check_bounds(&l.prog)?;
    Ok(l.prog)
}

/// Every element a loop kernel can touch lies inside its buffer.
fn check_loop(k: &LoopKernel, p: &KernelProgram) -> Result<()> {
    let fail = |what: String| Err(Error::Invalid(format!("kernel program out of bounds: {what}")));
    let span = |v: &View, shape: &[usize]| -> (isize, isize) {
        let (mut lo, mut hi) = (v.offset, v.offset);
        for (d, &s) in v.strides.iter().enumerate() {
            let reach = s * (shape[d] as isize - 1);
            if reach < 0 {
                lo += reach
            } else {
                hi += reach
            }
        }
        (lo, hi)
    };
    let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
    let mut views: Vec<(&View, &[usize])> = k.inputs.iter().map(|v| (v, &k.shape[..])).collect();
    views.push((&k.out, &k.shape[..kept]));
    for (v, shape) in views {
        if v.strides.len() != shape.len() {
            return fail(format!("{}: view rank {} for {} dims", k.name, v.strides.len(), shape.len()));
        }
        if shape.contains(&0) {
            continue; // an empty iteration touches nothing
        }
        let (lo, hi) = span(v, shape);
        if lo < 0 || hi >= p.buffers[v.buf].len as isize {
            return fail(format!("{}: [{lo}, {hi}] in a buffer of {}", k.name, p.buffers[v.buf].len));
        }
    }
    Ok(())
}

/// Every element a loop kernel can touch lies inside its buffer; every other step's sizes match.
pub fn check_bounds(p: &KernelProgram) -> Result<()> {
    let fail = |what: String| Err(Error::Invalid(format!("kernel program out of bounds: {what}")));
    for step in &p.steps {
        match step {
            Step::Loop(k) => check_loop(k, p)?,
            Step::MatMul(mm) => {
                let need = |stride: usize, one: usize| if mm.batch == 0 { 0 } else { stride * (mm.batch - 1) + one };
                let ok = p.buffers[mm.a].len >= need(mm.a_batch_stride, mm.m * mm.k)
                    && p.buffers[mm.b].len >= need(mm.b_batch_stride, mm.k * mm.n)
                    && p.buffers[mm.c].len == mm.batch * mm.m * mm.n;
                if !ok {
                    return fail(mm.name.clone());
                }
                if let Some(k) = &mm.epilogue {
                    check_loop(k, p)?;
                }
            }
            Step::Gather { x, idx, out, outer, axis_len, inner, .. } => {
                let n_idx = p.buffers[*idx].len;
                if p.buffers[*x].len != outer * axis_len * inner || p.buffers[*out].len != outer * n_idx * inner {
                    return fail("gather".into());
                }
            }
            Step::ScatterAdd { g, idx, out, outer, axis_len, inner, .. } => {
                let n_idx = p.buffers[*idx].len;
                if p.buffers[*out].len != outer * axis_len * inner || p.buffers[*g].len != outer * n_idx * inner {
                    return fail("scatter".into());
                }
            }
            Step::Random { state, out, len, .. } => {
                if p.buffers[*state].len != 2 || p.buffers[*out].len != *len {
                    return fail("random".into());
                }
            }
        }
    }
    Ok(())
}

/// How a backend writes one update of a shared variable.
#[derive(Clone, Debug, PartialEq)]
pub enum UpdateWrite {
    /// The kernel computing the new value writes it straight into the variable's buffer.
    InPlace { shared: usize },
    /// The new value is computed into `from` and copied into the variable after every step.
    CopyAtEnd { from: BufId, shared: usize },
}

/// Decides, for each update `(output, shared index)`, whether its value can be written in place:
/// when one loop kernel computes it, nothing reads the variable's old value after that kernel, the
/// kernel itself reads the old value only element by element at the position it writes, and the old
/// value is not also returned. Such a value's buffer is replaced by the variable's everywhere.
/// Other updates are copied at the end; a value that is itself a source buffer (another variable,
/// an input or a constant) is first copied into a temporary by a kernel at the start, so it keeps
/// the old value whatever is written in place.
pub fn place_updates(p: &mut KernelProgram, updates: &[(usize, usize)]) -> Vec<UpdateWrite> {
    let shared_buf = |p: &KernelProgram, s: usize| p.buffers.iter().position(|b| b.kind == BufKind::Shared(s));
    // Snapshot source-valued updates first.
    for &(o, _) in updates {
        let vb = p.outputs[o];
        if p.buffers[vb].kind != BufKind::Temp {
            let len = p.buffers[vb].len;
            let dtype = p.buffers[vb].dtype;
            p.buffers.push(Buffer { dtype, len, kind: BufKind::Temp });
            let snap = p.buffers.len() - 1;
            let copy = LoopKernel {
                name: format!("k{}_update_snapshot", p.steps.len()),
                origin: vec!["the old value of an updated variable".into()],
                shape: vec![len],
                inputs: vec![View { buf: vb, offset: 0, strides: vec![1] }],
                input_dtypes: vec![dtype],
                exprs: vec![ScalarExpr::Input(0)],
                out: View { buf: snap, offset: 0, strides: vec![1] },
                out_dtype: dtype,
                reduce: None,
            };
            p.steps.insert(0, Step::Loop(copy));
            p.outputs[o] = snap;
        }
    }
    let returned: Vec<BufId> =
        (0..p.outputs.len()).filter(|o| !updates.iter().any(|u| u.0 == *o)).map(|o| p.outputs[o]).collect();
    let mut writes = Vec::with_capacity(updates.len());
    for &(o, s) in updates {
        let vb = p.outputs[o];
        let Some(sb) = shared_buf(p, s) else {
            writes.push(UpdateWrite::CopyAtEnd { from: vb, shared: s });
            continue;
        };
        let writers: Vec<usize> = (0..p.steps.len()).filter(|&i| step_writes(&p.steps[i]).contains(&vb)).collect();
        // The loop kernel writing the value: a step of its own, or the epilogue of a product that
        // does not read the variable (its other row blocks may still be reading when one finishes).
        let kernel = match writers.as_slice() {
            [w] => match &p.steps[*w] {
                Step::Loop(k) => Some(k),
                Step::MatMul(m) if m.a != sb && m.b != sb => m.epilogue.as_deref().filter(|k| k.out.buf == vb),
                _ => None,
            },
            _ => None,
        };
        let in_place = p.buffers[vb].kind == BufKind::Temp
            && !returned.contains(&sb)
            && kernel.is_some_and(|k| {
                let w = writers[0];
                let same_view = |v: &View| v.offset == k.out.offset && v.strides == k.out.strides;
                k.inputs.iter().filter(|v| v.buf == sb).all(same_view)
                    && (w + 1..p.steps.len()).all(|i| !step_reads(&p.steps[i]).contains(&sb))
            });
        if in_place {
            replace_buffer(p, vb, sb);
            writes.push(UpdateWrite::InPlace { shared: s });
        } else {
            writes.push(UpdateWrite::CopyAtEnd { from: vb, shared: s });
        }
    }
    writes
}

/// The buffers a step writes (a product with an epilogue writes two).
pub fn step_writes(s: &Step) -> Vec<BufId> {
    match s {
        Step::Loop(k) => vec![k.out.buf],
        Step::MatMul(m) => std::iter::once(m.c).chain(m.epilogue.as_ref().map(|k| k.out.buf)).collect(),
        Step::Gather { out, .. } | Step::ScatterAdd { out, .. } | Step::Random { out, .. } => vec![*out],
    }
}

pub fn step_reads(s: &Step) -> Vec<BufId> {
    match s {
        Step::Loop(k) => k.inputs.iter().map(|v| v.buf).collect(),
        Step::MatMul(m) => {
            [m.a, m.b].into_iter().chain(m.epilogue.iter().flat_map(|k| k.inputs.iter().map(|v| v.buf))).collect()
        }
        Step::Gather { x, idx, .. } => vec![*x, *idx],
        Step::ScatterAdd { g, idx, .. } => vec![*g, *idx],
        Step::Random { state, .. } => vec![*state],
    }
}

/// Makes every step and output use buffer `to` where it used `from`.
fn replace_buffer(p: &mut KernelProgram, from: BufId, to: BufId) {
    let r = |b: &mut BufId| {
        if *b == from {
            *b = to
        }
    };
    for s in &mut p.steps {
        match s {
            Step::Loop(k) => {
                k.inputs.iter_mut().for_each(|v| r(&mut v.buf));
                r(&mut k.out.buf);
            }
            Step::MatMul(m) => {
                [&mut m.a, &mut m.b, &mut m.c].into_iter().for_each(r);
                if let Some(k) = &mut m.epilogue {
                    k.inputs.iter_mut().for_each(|v| r(&mut v.buf));
                    r(&mut k.out.buf);
                }
            }
            Step::Gather { x, idx, out, .. } => [x, idx, out].into_iter().for_each(r),
            Step::ScatterAdd { g, idx, out, .. } => [g, idx, out].into_iter().for_each(r),
            Step::Random { state, out, .. } => [state, out].into_iter().for_each(r),
        }
    }
    p.outputs.iter_mut().for_each(r);
}
