//! Lowering a specialized graph to a kernel program: one step (or a few) per node, in
//! topological order. Elementwise and fused nodes become loop kernels over broadcast views (and,
//! when they alone consume a 2-D product, that product's epilogue); reductions loop kernels with
//! the reduced dims innermost; movement ops copies through strided views (reshapes alias,
//! transposes that only feed products are read by strides, and broadcasts that only feed
//! elementwise or fused kernels are read through stride-0 views); softmax, log-softmax and softmax
//! cross-entropy a max, a sum of exponentials and the result.

use super::*;
use kiln_ir::ops::{MoveOp, NnOp, Op, ReduceOp, Scalar, SliceRange, SourceOp, UnaryOp};
use kiln_ir::{At, Graph, NodeId};
use std::collections::HashMap;

struct Lowering<'g> {
    g: &'g Graph,
    prog: KernelProgram,
    buf_of: HashMap<NodeId, BufId>,
    /// Transposes of the last two axes read only by matrix products: node -> the node it transposes.
    transposed_only: HashMap<NodeId, NodeId>,
    /// Broadcasts read only by elementwise and fused kernels: node -> the node it broadcasts. The
    /// kernels read the source through a broadcast view (stride 0), so no copy is made.
    broadcast_only: HashMap<NodeId, NodeId>,
    /// Steps named so far (names stay unique when a kernel moves into a product as its epilogue).
    named: usize,
    /// Row max and row sum of exponentials already computed for (node, axis).
    row_stats: HashMap<(NodeId, usize), (BufId, BufId)>,
}

impl<'g> Lowering<'g> {
    fn shape(&self, n: NodeId) -> Vec<usize> {
        self.g.ty(n).concrete().expect("specialized graph")
    }
    /// The node whose buffer an elementwise kernel reads for operand `n`: the source of a
    /// broadcast it reads through a stride-0 view, else `n` itself.
    fn read_through(&self, n: NodeId) -> NodeId {
        self.broadcast_only.get(&n).copied().unwrap_or(n)
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
        let inputs = operands
            .iter()
            .map(|&o| {
                let o = self.read_through(o);
                broadcast_view(self.buf_of[&o], &self.shape(o), shape)
            })
            .collect();
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
                    let mut eshape = vec![];
                    for &i in &ins {
                        eshape = broadcast(&eshape, &self.shape(i));
                    }
                    let ops: Vec<(BufId, Vec<usize>)> = ins
                        .iter()
                        .map(|&i| {
                            let i = self.read_through(i);
                            (self.buf_of[&i], self.shape(i))
                        })
                        .collect();
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
                let name = self.name("random");
                self.prog.steps.push(Step::Random { name, op: r.clone(), state: self.buf_of[&ins[0]], out });
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
            MoveOp::Take { axis } | MoveOp::TakeGrad { axis, .. } => {
                let out = self.temp(dtype, len);
                // The indexed side: a take's operand, or its gradient's result.
                let take = matches!(m, MoveOp::Take { .. });
                let indexed: &[usize] = if take { &xs } else { shape };
                let g = Gather {
                    name: self.name(if take { "take" } else { "take_grad" }),
                    src: xb,
                    idx: self.buf_of[&ins[1]],
                    out,
                    outer: indexed[..*axis].iter().product(),
                    axis_len: indexed[*axis],
                    inner: indexed[axis + 1..].iter().product(),
                    dtype,
                    at: self.g.node(n).at,
                };
                self.prog.steps.push(if take { Step::Gather(g) } else { Step::ScatterAdd(g) });
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
        // The row statistics of an input are computed once: a softmax cross-entropy and the
        // softmax of its gradient share them.
        let cached = self.row_stats.get(&(x, axis)).copied();
        let m = match cached {
            Some((m, _)) => m,
            None => {
                self.reduction(n, "row_max", &[(xb, xs.clone())], vec![Input(0)], &xs, ReduceOp::Max, &[axis], dtype)
            }
        };
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
        let s = match cached {
            Some((_, s)) => s,
            None => {
                let mut sum_exprs = shifted(0, 1);
                sum_exprs.push(Unary(UnaryOp::Exp, 7));
                let ops = [(xb, xs.clone()), (m, keep.clone())];
                let s = self.reduction(n, "row_sumexp", &ops, sum_exprs, &xs, ReduceOp::Sum, &[axis], dtype);
                self.row_stats.insert((x, axis), (m, s));
                s
            }
        };
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
    let mut broadcast_only = HashMap::new();
    for n in g.topo_order(g.outputs()) {
        if let Op::Movement(MoveOp::BroadcastTo(_)) = g.op(n) {
            let users = g.users(n);
            let elementwise = |u: NodeId| matches!(g.op(u), Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Fused(_));
            if !users.is_empty() && !g.outputs().contains(&n) && users.iter().all(|&u| elementwise(u)) {
                broadcast_only.insert(n, g.inputs(n)[0]);
            }
        }
    }
    let mut l = Lowering {
        g,
        prog: KernelProgram { buffers: vec![], steps: vec![], outputs: vec![] },
        buf_of: HashMap::new(),
        transposed_only,
        broadcast_only,
        named: 0,
        row_stats: HashMap::new(),
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
        if !l.buf_of.contains_key(&n) && !l.transposed_only.contains_key(&n) && !l.broadcast_only.contains_key(&n) {
            l.lower_node(n)?;
        }
    }
    l.prog.outputs = g.outputs().iter().map(|o| l.buf_of[o]).collect();
    check_bounds(&l.prog)?;
    Ok(l.prog)
}
