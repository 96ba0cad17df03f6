//! Reverse-mode differentiation as a graph-to-graph transformation: `grad` appends to the graph the
//! nodes that compute d cost / d wrt, built from each op's VJP, so the result is an ordinary graph
//! that is optimized, printed, compiled, and differentiated again like any other. A `wrt` the cost
//! does not reach, or reaches only through non-differentiable ops, is an error naming the path, unless
//! the caller asks for zeros (Theano's `disconnected_inputs`).
//!
//! The cost is differentiated in its stabilized form: the stabilization rules are applied to a
//! shadow copy of the cost's subgraph first (the user's nodes are left as they are), so the gradient
//! of `log(softmax(x))` is that of `log_softmax(x)` and never divides by an underflowed softmax.

use crate::error::{At, Error, Result};
use crate::graph::{Graph, NodeId};
use crate::ops::{MoveOp, SliceRange};
use crate::types::Dim;
use std::collections::HashMap;

/// What to do with a `wrt` whose gradient does not exist.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Disconnected {
    #[default]
    Raise,
    Zero,
}

fn describe(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    match &node.name {
        Some(name) => format!("'{name}'"),
        None => format!("{} at {}", node.op.label(), At(node.at)),
    }
}

/// The gradients of scalar `cost` with respect to each of `wrt`.
pub fn grad(g: &mut Graph, cost: NodeId, wrt: &[NodeId], disconnected: Disconnected) -> Result<Vec<NodeId>> {
    let cty = g.ty(cost).clone();
    if cty.rank() != 0 || !cty.dtype.is_float() {
        return Err(Error::Grad {
            detail: format!(
                "the cost must be a float scalar, got {cty} ({}); reduce it with sum() or mean()",
                describe(g, cost)
            ),
        });
    }
    for &w in wrt {
        if !g.ty(w).dtype.is_float() {
            return Err(Error::Grad {
                detail: format!(
                    "{} has dtype {}; gradients exist only for float tensors",
                    describe(g, w),
                    g.ty(w).dtype
                ),
            });
        }
    }
    let cost = stabilized_shadow(g, cost, wrt)?;
    let order = g.topo_order(&[cost]);
    // Only nodes that some `wrt` flows into need a gradient.
    let mut needed: HashMap<NodeId, bool> = HashMap::new();
    for &n in &order {
        let d = wrt.contains(&n) || g.inputs(n).iter().any(|i| needed[i]);
        needed.insert(n, d);
    }
    let at = g.node(cost).at;
    let mut pending: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    let seed = g.scalar(cty.dtype, 1.0, at);
    pending.insert(cost, vec![seed]);
    let mut totals: HashMap<NodeId, NodeId> = HashMap::new();
    // Values the gradient could not pass through (a comparison, an argmax, a cast from an integer).
    let mut blocked: Vec<NodeId> = Vec::new();
    for &n in order.iter().rev() {
        let Some(parts) = pending.remove(&n) else {
            continue;
        };
        if !needed[&n] {
            continue;
        }
        let mut total = parts[0];
        for &p in &parts[1..] {
            total = g.add2(total, p, g.node(n).at)?;
        }
        totals.insert(n, total);
        if wrt.contains(&n) && g.inputs(n).is_empty() {
            continue;
        }
        let op = g.op(n).clone();
        let grads = op.vjp(g, n, total)?;
        let inputs = g.inputs(n).to_vec();
        for (i, gi) in inputs.into_iter().zip(grads.into_iter().chain(std::iter::repeat(None))) {
            if !needed[&i] {
                continue;
            }
            match gi {
                Some(gi) => {
                    debug_assert_eq!(
                        g.ty(gi).shape.len(),
                        g.ty(i).shape.len(),
                        "VJP of {} has the wrong rank",
                        op.label()
                    );
                    pending.entry(i).or_default().push(gi)
                }
                None => blocked.push(i),
            }
        }
    }
    let mut out = Vec::with_capacity(wrt.len());
    for &w in wrt {
        match totals.get(&w) {
            Some(&t) => out.push(t),
            None if disconnected == Disconnected::Zero => {
                out.push(crate::ops::elementwise::zeros_like(g, w, at)?);
            }
            None => {
                let why = match (needed.get(&w), blocked.first()) {
                    (Some(true), Some(&value)) => {
                        format!("the cost reaches it only through a non-differentiable value ({})", describe(g, value))
                    }
                    _ => "the cost does not depend on it".to_string(),
                };
                return Err(Error::Grad {
                    detail: format!(
                        "no gradient for {}: {why} (ask for zeros with Disconnected::Zero)",
                        describe(g, w)
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// A copy of `cost`'s subgraph with the stabilization rules applied, sharing every node they do
/// not change (and never changing a `wrt` node, so the gradients still reach it).
fn stabilized_shadow(g: &mut Graph, cost: NodeId, wrt: &[NodeId]) -> Result<NodeId> {
    let mut shadow: HashMap<NodeId, NodeId> = HashMap::new();
    for n in g.topo_order(&[cost]) {
        if wrt.contains(&n) || g.inputs(n).is_empty() {
            shadow.insert(n, n);
            continue;
        }
        let ins: Vec<NodeId> = g.inputs(n).iter().map(|i| shadow[i]).collect();
        let mut m = n;
        if ins != g.inputs(n) {
            let (op, at) = (g.op(n).clone(), g.node(n).at);
            m = g.add(op, &ins, at)?;
        }
        for rule in crate::passes::stabilize::RULES {
            if let Some(r) = (rule.apply)(g, m)? {
                if g.ty(r) == g.ty(n) {
                    m = r;
                    break;
                }
            }
        }
        shadow.insert(n, m);
    }
    Ok(shadow[&cost])
}

/// The Jacobian of `y` (fixed shape) with respect to `x`: shape `y.shape + x.shape`. One reverse
/// pass per element of `y`, so meant for small cases.
pub fn jacobian(g: &mut Graph, y: NodeId, x: NodeId, disconnected: Disconnected) -> Result<NodeId> {
    let yty = g.ty(y).clone();
    let at = g.node(y).at;
    let n = yty
        .concrete()
        .map(|s| s.iter().product::<usize>())
        .ok_or_else(|| Error::Grad { detail: format!("jacobian needs a fixed-shape output, got {yty}") })?;
    let flat = g.reshape_to(y, &[Dim::Fixed(n)], at)?;
    let xshape = g.ty(x).shape.clone();
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let r = SliceRange { start: Some(i as i64), stop: Some(i as i64 + 1), step: 1 };
        let yi = g.movement(MoveOp::Slice(vec![r]), &[flat], at)?;
        let yi = g.reshape_to(yi, &[], at)?;
        let gi = grad(g, yi, &[x], disconnected)?[0];
        let mut one_row = vec![Dim::Fixed(1)];
        one_row.extend(xshape.iter().cloned());
        rows.push(g.reshape_to(gi, &one_row, at)?);
    }
    let j = g.movement(MoveOp::Concat { axis: 0 }, &rows, at)?;
    let mut shape = yty.shape.clone();
    shape.extend(xshape);
    g.reshape_to(j, &shape, at)
}

/// The Hessian of scalar `cost` with respect to `x`: shape `x.shape + x.shape`.
pub fn hessian(g: &mut Graph, cost: NodeId, x: NodeId) -> Result<NodeId> {
    let gx = grad(g, cost, &[x], Disconnected::Raise)?[0];
    jacobian(g, gx, x, Disconnected::Zero)
}
