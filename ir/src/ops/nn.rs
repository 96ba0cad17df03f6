//! Neural-network ops that earn their own variant for numerical stability: softmax and log-softmax
//! along an axis (max-subtracted), and softmax cross-entropy on logits, `-sum(t * log_softmax(z))`,
//! which the stabilization pass makes from the naive composition. Binary and sparse categorical
//! cross-entropies are compositions in the user API that the same pass stabilizes.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::ops::reduce::reduced_shape;
use crate::ops::{Op, UnaryOp};
use crate::tensor::Tensor;
use crate::types::TensorType;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum NnOp {
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },
    /// Operands `[logits, targets]` of one shape; the output drops `axis`.
    SoftmaxCrossEntropy {
        axis: usize,
    },
}

impl NnOp {
    pub fn label(&self) -> String {
        match self {
            NnOp::Softmax { axis } => format!("softmax{{axis={axis}}}"),
            NnOp::LogSoftmax { axis } => format!("log_softmax{{axis={axis}}}"),
            NnOp::SoftmaxCrossEntropy { axis } => format!("softmax_cross_entropy{{axis={axis}}}"),
        }
    }
    fn axis(&self) -> usize {
        match *self {
            NnOp::Softmax { axis } | NnOp::LogSoftmax { axis } | NnOp::SoftmaxCrossEntropy { axis } => axis,
        }
    }
}

pub fn infer(op: &NnOp, ins: &[&TensorType]) -> Result<TensorType, String> {
    let arity = if matches!(op, NnOp::SoftmaxCrossEntropy { .. }) { 2 } else { 1 };
    if ins.len() != arity {
        return Err(format!("expects {arity} operand(s), got {}", ins.len()));
    }
    let x = ins[0];
    if !x.dtype.is_float() {
        return Err(format!("needs a float dtype, got {}", x.dtype));
    }
    if op.axis() >= x.rank() {
        return Err(format!("axis {} out of range for rank {}", op.axis(), x.rank()));
    }
    match op {
        NnOp::SoftmaxCrossEntropy { axis } => {
            let t = ins[1];
            if t.dtype != x.dtype || crate::types::broadcast_shapes(&x.shape, &t.shape).as_ref() != Some(&x.shape) {
                return Err("targets must have the logits' dtype and shape".into());
            }
            Ok(TensorType::new(x.dtype, reduced_shape(&x.shape, &[*axis], false)))
        }
        _ => Ok(x.clone()),
    }
}

/// The values of `x` with `axis` moved last, as rows of f64, and the permutation used.
fn rows(x: &Tensor, axis: usize) -> (Vec<f64>, usize, Vec<usize>) {
    let r = x.shape().len();
    let mut perm: Vec<usize> = (0..r).filter(|&a| a != axis).collect();
    perm.push(axis);
    let vals = crate::with_array!(x, a => a.view().permuted_axes(perm.clone()).iter().map(|&v| crate::ops::Scalar::from(v).as_f64()).collect());
    (vals, x.shape()[axis], perm)
}

fn log_softmax_row(row: &[f64], out: &mut [f64]) {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let m = if m.is_finite() { m } else { 0.0 };
    let lse = row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
    for (o, v) in out.iter_mut().zip(row) {
        *o = v - lse;
    }
}

pub fn eval(op: &NnOp, ins: &[&Tensor], out: &TensorType) -> Result<Tensor, String> {
    let x = ins[0];
    let axis = op.axis();
    let (vals, n, perm) = rows(x, axis);
    let mut ls = vec![0.0; vals.len()];
    for (r, o) in vals.chunks(n.max(1)).zip(ls.chunks_mut(n.max(1))) {
        log_softmax_row(r, o);
    }
    let oshape = out.concrete().ok_or("output shape is not concrete")?;
    match op {
        NnOp::Softmax { .. } | NnOp::LogSoftmax { .. } => {
            if matches!(op, NnOp::Softmax { .. }) {
                ls.iter_mut().for_each(|v| *v = v.exp());
            }
            let pshape: Vec<usize> = perm.iter().map(|&a| x.shape()[a]).collect();
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            let t = Tensor::from_f64(x.dtype(), &pshape, &ls);
            Ok(crate::map_array!(t, a => a.permuted_axes(inv.clone()).as_standard_layout().into_owned()))
        }
        NnOp::SoftmaxCrossEntropy { .. } => {
            let tb = crate::map_array!(ins[1], a => a.broadcast(ndarray::IxDyn(x.shape())).ok_or("targets do not broadcast")?.to_owned());
            let (t, _, _) = rows(&tb, axis);
            let res: Vec<f64> = t
                .chunks(n.max(1))
                .zip(ls.chunks(n.max(1)))
                .map(|(tr, lr)| -tr.iter().zip(lr).filter(|(t, _)| **t != 0.0).map(|(t, l)| t * l).sum::<f64>())
                .collect();
            Ok(Tensor::from_f64(x.dtype(), &oshape, &res))
        }
    }
}

pub fn vjp(op: &NnOp, gr: &mut Graph, node: NodeId, g: NodeId) -> Result<Vec<Option<NodeId>>> {
    let ins = gr.inputs(node).to_vec();
    let at = gr.node(node).at;
    let axis = op.axis();
    Ok(match op {
        // d softmax: y * (g - sum(g * y))
        NnOp::Softmax { .. } => {
            let gy = gr.mul2(g, node, at)?;
            let s = gr.sum(gy, &[axis], true, at)?;
            let d = gr.sub2(g, s, at)?;
            vec![Some(gr.mul2(node, d, at)?)]
        }
        // d log_softmax: g - exp(y) * sum(g)
        NnOp::LogSoftmax { .. } => {
            let s = gr.sum(g, &[axis], true, at)?;
            let p = gr.unary(UnaryOp::Exp, node, at)?;
            let t = gr.mul2(p, s, at)?;
            vec![Some(gr.sub2(g, t, at)?)]
        }
        // loss = -sum(t * log_softmax(z)): dz = g * (softmax(z) * sum(t) - t), dt = -g * log_softmax(z)
        NnOp::SoftmaxCrossEntropy { .. } => {
            let (z, t) = (ins[0], ins[1]);
            let keep = reduced_shape(&gr.ty(z).shape, &[axis], true);
            let gk = gr.reshape_to(g, &keep, at)?;
            let p = gr.add(Op::Nn(NnOp::Softmax { axis }), &[z], at)?;
            let st = gr.sum(t, &[axis], true, at)?;
            let pst = gr.mul2(p, st, at)?;
            let d = gr.sub2(pst, t, at)?;
            let dz = gr.mul2(gk, d, at)?;
            let ls = gr.add(Op::Nn(NnOp::LogSoftmax { axis }), &[z], at)?;
            let dt = gr.mul2(gk, ls, at)?;
            let dt = gr.neg(dt, at)?;
            let tshape = gr.ty(t).shape.clone();
            vec![Some(dz), Some(gr.sum_to(dt, &tshape, at)?)]
        }
    })
}
