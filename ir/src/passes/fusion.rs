//! Elementwise fusion: groups each maximal elementwise region into one `Fused` node holding its scalar
//! expression DAG, then folds a fused region into the reduction that alone reads it (the reduction's
//! elementwise prologue). A node joins its reader's region only when it has exactly one reader, is not
//! a graph output, and has the reader's shape — so no value is computed twice and nothing is
//! recomputed per broadcast element. 0-d constants are inlined into the expression.

use super::RewriteLog;
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::ops::{FusedKernel, Op, ReduceOp, ScalarExpr};
use std::collections::HashMap;
use std::sync::Arc;

fn merges_into_reader(g: &Graph, n: NodeId) -> bool {
    // One distinct reader (it may read the node in several operand slots, as in x * x).
    let users = g.users(n);
    if !g.op(n).is_elementwise() || users.len() != 1 || g.outputs().contains(&n) {
        return false;
    }
    let reader = users[0];
    g.op(reader).is_elementwise() && g.ty(reader).shape == g.ty(n).shape
}

/// Builds the kernel of the region rooted at `root`; returns it with its operand nodes.
fn build_region(g: &Graph, root: NodeId) -> (FusedKernel, Vec<NodeId>) {
    let mut exprs = Vec::new();
    let mut leaves: Vec<NodeId> = Vec::new();
    let mut slot: HashMap<NodeId, usize> = HashMap::new();
    // Post-order over the region; leaves are operands that do not merge into it.
    let mut stack = vec![(root, false)];
    while let Some((n, expanded)) = stack.pop() {
        if slot.contains_key(&n) {
            continue;
        }
        let inside = n == root || merges_into_reader(g, n);
        if inside && !expanded {
            stack.push((n, true));
            for &i in g.inputs(n).iter().rev() {
                stack.push((i, false));
            }
            continue;
        }
        let e = if inside {
            let a = |k: usize| slot[&g.inputs(n)[k]];
            match g.op(n) {
                Op::Unary(u) => ScalarExpr::Unary(*u, a(0)),
                Op::Binary(b) => ScalarExpr::Binary(*b, a(0), a(1)),
                Op::Where => ScalarExpr::Where(a(0), a(1), a(2)),
                _ => unreachable!("only elementwise nodes are inside a region"),
            }
        } else if let Some(c) = g.op(n).as_constant().filter(|c| c.shape().is_empty()) {
            ScalarExpr::Const(crate::ops::elementwise::broadcast_scalars(c, &[]).expect("0-d")[0])
        } else {
            let k = leaves.iter().position(|&l| l == n).unwrap_or_else(|| {
                leaves.push(n);
                leaves.len() - 1
            });
            ScalarExpr::Input(k)
        };
        slot.insert(n, exprs.len());
        exprs.push(e);
    }
    (FusedKernel { exprs, n_inputs: leaves.len(), reduce: None }, leaves)
}

pub fn run(g: &mut Graph, log: &mut RewriteLog) -> Result<bool> {
    let order = g.topo_order(g.outputs());
    let roots: Vec<NodeId> =
        order.iter().copied().filter(|&n| g.op(n).is_elementwise() && !merges_into_reader(g, n)).collect();
    let mut changed = false;
    for root in roots {
        let (kernel, leaves) = build_region(g, root);
        let at = g.node(root).at;
        let fused = g.add(Op::Fused(Arc::new(kernel)), &leaves, at)?;
        if g.ty(fused) != g.ty(root) {
            g.remove(fused); // symbolic dims resolved in another order; keep the region unfused
            continue;
        }
        if let Some(name) = g.node(root).name.clone() {
            g.set_name(fused, &name);
        }
        g.replace_all_uses(root, fused);
        log.record("fuse_elementwise");
        changed = true;
    }
    super::dce::remove_dead(g);
    // Reductions of a fused region that nothing else reads take the region as their prologue.
    for n in g.topo_order(g.outputs()) {
        let Op::Reduce { op, axes, keepdims } = g.op(n).clone() else {
            continue;
        };
        if op == ReduceOp::ArgMax {
            continue;
        }
        let src = g.inputs(n)[0];
        let Op::Fused(k) = g.op(src) else { continue };
        if k.reduce.is_some() || g.use_count(src) != 1 || g.outputs().contains(&src) {
            continue;
        }
        let kernel = FusedKernel { reduce: Some((op, axes, keepdims)), ..(**k).clone() };
        let (leaves, at) = (g.inputs(src).to_vec(), g.node(n).at);
        let fused = g.add(Op::Fused(Arc::new(kernel)), &leaves, at)?;
        if g.ty(fused) != g.ty(n) {
            g.remove(fused);
            continue;
        }
        g.replace_all_uses(n, fused);
        log.record("fuse_reduce_prologue");
        changed = true;
    }
    super::dce::remove_dead(g);
    Ok(changed)
}
