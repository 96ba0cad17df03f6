//! Stabilization: rewrites of expressions that overflow, underflow or cancel in floating point into
//! forms that do not. Runs before constant folding so that constants fold through the stable form.

use super::pat::{binary, is_const, unary};
use super::{rewrite_to_fixpoint, RewriteLog, Rule};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::ops::{BinaryOp as B, NnOp, Op, ReduceOp, UnaryOp as U};

pub const RULES: &[Rule] = &[
    Rule { name: "log_sigmoid", apply: log_sigmoid },
    Rule { name: "log_one_minus_sigmoid", apply: log_one_minus_sigmoid },
    Rule { name: "log_softmax", apply: log_softmax },
    Rule { name: "softmax_cross_entropy", apply: softmax_cross_entropy },
    Rule { name: "log1p", apply: log1p },
    Rule { name: "log1p_exp", apply: log1p_exp },
    Rule { name: "expm1", apply: expm1 },
];

pub fn run(g: &mut Graph, log: &mut RewriteLog) -> Result<bool> {
    rewrite_to_fixpoint(g, RULES, log)
}

// log(sigmoid(x)) -> -softplus(-x)
fn log_sigmoid(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some(x) = unary(g, n, U::Log).and_then(|s| unary(g, s, U::Sigmoid)) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    let nx = g.neg(x, at)?;
    let sp = g.unary(U::Softplus, nx, at)?;
    Ok(Some(g.neg(sp, at)?))
}

// log(1 - sigmoid(x)) -> -softplus(x)
fn log_one_minus_sigmoid(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some(inner) = unary(g, n, U::Log) else {
        return Ok(None);
    };
    let Some((one, s)) = binary(g, inner, B::Sub) else {
        return Ok(None);
    };
    let Some(x) = unary(g, s, U::Sigmoid).filter(|_| is_const(g, one, 1.0)) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    let sp = g.unary(U::Softplus, x, at)?;
    Ok(Some(g.neg(sp, at)?))
}

// log(softmax(x)) -> log_softmax(x)
fn log_softmax(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some(s) = unary(g, n, U::Log) else {
        return Ok(None);
    };
    let Op::Nn(NnOp::Softmax { axis }) = *g.op(s) else {
        return Ok(None);
    };
    let (x, at) = (g.inputs(s)[0], g.node(n).at);
    Ok(Some(g.add(Op::Nn(NnOp::LogSoftmax { axis }), &[x], at)?))
}

// -sum(t * log_softmax(z), axis) -> softmax_cross_entropy(z, t)
fn softmax_cross_entropy(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some(s) = unary(g, n, U::Neg) else {
        return Ok(None);
    };
    let Op::Reduce { op: ReduceOp::Sum, axes, keepdims: false } = g.op(s) else {
        return Ok(None);
    };
    if axes.len() != 1 {
        return Ok(None);
    }
    let axis = axes[0];
    let Some((a, b)) = binary(g, g.inputs(s)[0], B::Mul) else {
        return Ok(None);
    };
    let is_ls = |m: NodeId| *g.op(m) == Op::Nn(NnOp::LogSoftmax { axis });
    let (t, ls) = if is_ls(b) {
        (a, b)
    } else if is_ls(a) {
        (b, a)
    } else {
        return Ok(None);
    };
    let (z, at) = (g.inputs(ls)[0], g.node(n).at);
    Ok(g.add(Op::Nn(NnOp::SoftmaxCrossEntropy { axis }), &[z, t], at).ok())
}

// log(1 + x) -> log1p(x) ; log(x + 1) -> log1p(x) ; log(1 - x) -> log1p(-x)
fn log1p(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some(inner) = unary(g, n, U::Log) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    if let Some((a, b)) = binary(g, inner, B::Add) {
        let x = if is_const(g, a, 1.0) {
            b
        } else if is_const(g, b, 1.0) {
            a
        } else {
            return Ok(None);
        };
        return Ok(Some(g.unary(U::Log1p, x, at)?));
    }
    if let Some((one, x)) = binary(g, inner, B::Sub).filter(|&(a, _)| is_const(g, a, 1.0)) {
        let _ = one;
        let nx = g.neg(x, at)?;
        return Ok(Some(g.unary(U::Log1p, nx, at)?));
    }
    Ok(None)
}

// log1p(exp(x)) -> softplus(x)
fn log1p_exp(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some(x) = unary(g, n, U::Log1p).and_then(|e| unary(g, e, U::Exp)) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    Ok(Some(g.unary(U::Softplus, x, at)?))
}

// exp(x) - 1 -> expm1(x)
fn expm1(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some((e, one)) = binary(g, n, B::Sub) else {
        return Ok(None);
    };
    let Some(x) = unary(g, e, U::Exp).filter(|_| is_const(g, one, 1.0)) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    Ok(Some(g.unary(U::Expm1, x, at)?))
}
