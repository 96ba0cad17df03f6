//! Canonicalization and algebraic simplification: identities that remove work without changing any
//! value (no rule here assumes finite inputs: `x * 0 -> 0` is not a rule, since inf * 0 is NaN).

use super::pat::{binary, const_value, is_const, unary};
use super::{rewrite_to_fixpoint, RewriteLog, Rule};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::ops::{BinaryOp as B, MoveOp, Op, UnaryOp as U};

pub const RULES: &[Rule] = &[
    Rule { name: "add_zero", apply: add_zero },
    Rule { name: "sub_zero", apply: sub_zero },
    Rule { name: "mul_one", apply: mul_one },
    Rule { name: "div_one", apply: div_one },
    Rule { name: "mul_neg_one", apply: mul_neg_one },
    Rule { name: "neg_neg", apply: neg_neg },
    Rule { name: "add_neg", apply: add_neg },
    Rule { name: "sub_neg", apply: sub_neg },
    Rule { name: "div_const", apply: div_const },
    Rule { name: "pow_const", apply: pow_const },
    Rule { name: "log_exp", apply: log_exp },
    Rule { name: "not_not", apply: not_not },
    Rule { name: "permute_permute", apply: permute_permute },
    Rule { name: "reshape_reshape", apply: reshape_reshape },
    Rule { name: "movement_identity", apply: movement_identity },
];

pub fn run(g: &mut Graph, log: &mut RewriteLog) -> Result<bool> {
    rewrite_to_fixpoint(g, RULES, log)
}

// x + 0 -> x ; 0 + x -> x
fn add_zero(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    Ok(binary(g, n, B::Add).and_then(|(a, b)| {
        if is_const(g, b, 0.0) {
            Some(a)
        } else if is_const(g, a, 0.0) {
            Some(b)
        } else {
            None
        }
    }))
}

// x - 0 -> x
fn sub_zero(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    Ok(binary(g, n, B::Sub).and_then(|(a, b)| is_const(g, b, 0.0).then_some(a)))
}

// x * 1 -> x ; 1 * x -> x
fn mul_one(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    Ok(binary(g, n, B::Mul).and_then(|(a, b)| {
        if is_const(g, b, 1.0) {
            Some(a)
        } else if is_const(g, a, 1.0) {
            Some(b)
        } else {
            None
        }
    }))
}

// x / 1 -> x
fn div_one(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    Ok(binary(g, n, B::Div).and_then(|(a, b)| is_const(g, b, 1.0).then_some(a)))
}

// x * -1 -> -x ; -1 * x -> -x
fn mul_neg_one(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some((a, b)) = binary(g, n, B::Mul) else {
        return Ok(None);
    };
    let x = if is_const(g, b, -1.0) {
        a
    } else if is_const(g, a, -1.0) {
        b
    } else {
        return Ok(None);
    };
    let at = g.node(n).at;
    Ok(Some(g.neg(x, at)?))
}

// -(-x) -> x
fn neg_neg(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    Ok(unary(g, n, U::Neg).and_then(|x| unary(g, x, U::Neg)))
}

// a + (-b) -> a - b ; (-a) + b -> b - a
fn add_neg(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some((a, b)) = binary(g, n, B::Add) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    if let Some(nb) = unary(g, b, U::Neg) {
        return Ok(Some(g.sub2(a, nb, at)?));
    }
    if let Some(na) = unary(g, a, U::Neg) {
        return Ok(Some(g.sub2(b, na, at)?));
    }
    Ok(None)
}

// a - (-b) -> a + b
fn sub_neg(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some((a, b)) = binary(g, n, B::Sub) else {
        return Ok(None);
    };
    let Some(nb) = unary(g, b, U::Neg) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    Ok(Some(g.add2(a, nb, at)?))
}

// x / c -> x * (1/c), for a constant c whose reciprocal is exact (a power of two), so no value changes
fn div_const(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some((a, b)) = binary(g, n, B::Div) else {
        return Ok(None);
    };
    let Some(c) = const_value(g, b) else {
        return Ok(None);
    };
    let r = 1.0 / c;
    let exact = c != 0.0 && c.is_finite() && r.is_finite() && (c.abs().log2().fract() == 0.0) && c != 1.0;
    if !exact || g.ty(b).rank() != 0 {
        return Ok(None);
    }
    let at = g.node(n).at;
    Ok(Some(g.scale(a, r, at)?))
}

// x ** 1 -> x ; x ** 2 -> x * x ; x ** 0.5 -> sqrt(x) ; x ** -0.5 -> rsqrt(x) ; x ** -1 -> 1/x
fn pow_const(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Some((x, e)) = binary(g, n, B::Pow) else {
        return Ok(None);
    };
    let Some(p) = const_value(g, e) else {
        return Ok(None);
    };
    let at = g.node(n).at;
    Ok(Some(match p {
        1.0 => x,
        2.0 => g.mul2(x, x, at)?,
        0.5 => g.unary(U::Sqrt, x, at)?,
        -0.5 => g.unary(U::Rsqrt, x, at)?,
        -1.0 => g.unary(U::Reciprocal, x, at)?,
        _ => return Ok(None),
    }))
}

// log(exp(x)) -> x
fn log_exp(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    Ok(unary(g, n, U::Log).and_then(|e| unary(g, e, U::Exp)))
}

// not(not(x)) -> x
fn not_not(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    Ok(unary(g, n, U::Not).and_then(|x| unary(g, x, U::Not)))
}

// permute(permute(x, p), q) -> permute(x, [p[q[i]]])
fn permute_permute(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Op::Movement(MoveOp::Permute(q)) = g.op(n) else {
        return Ok(None);
    };
    let inner = g.inputs(n)[0];
    let Op::Movement(MoveOp::Permute(p)) = g.op(inner) else {
        return Ok(None);
    };
    let composed: Vec<usize> = q.iter().map(|&i| p[i]).collect();
    let (x, at) = (g.inputs(inner)[0], g.node(n).at);
    Ok(Some(g.permute(x, composed, at)?))
}

// reshape(reshape(x)) -> reshape(x)
fn reshape_reshape(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Op::Movement(MoveOp::Reshape(spec)) = g.op(n) else {
        return Ok(None);
    };
    let inner = g.inputs(n)[0];
    if !matches!(g.op(inner), Op::Movement(MoveOp::Reshape(_))) {
        return Ok(None);
    }
    let (spec, x, at) = (spec.clone(), g.inputs(inner)[0], g.node(n).at);
    Ok(g.reshape(x, spec, at).ok())
}

// reshape(x) -> x, broadcast_to(x) -> x, permute(x, identity) -> x, slice(x, full) -> x, when the type is x's
fn movement_identity(g: &mut Graph, n: NodeId) -> Result<Option<NodeId>> {
    let Op::Movement(m) = g.op(n) else {
        return Ok(None);
    };
    let x = g.inputs(n)[0];
    let identity = match m {
        MoveOp::Reshape(_) | MoveOp::BroadcastTo(_) => g.ty(x) == g.ty(n),
        MoveOp::Permute(p) => p.iter().enumerate().all(|(i, &j)| i == j),
        MoveOp::Slice(r) => r.iter().all(|r| r.is_full()),
        _ => false,
    };
    Ok(identity.then_some(x))
}
