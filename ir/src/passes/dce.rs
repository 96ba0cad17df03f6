//! Dead-code elimination: removes every node the outputs do not read. Inputs stay, since they are
//! the function's signature even when unused, and so do shared variables (a function may write a
//! variable it never reads).

use super::RewriteLog;
use crate::error::Result;
use crate::graph::Graph;
use crate::ops::{Op, SourceOp};

/// Removes dead nodes; returns how many.
pub fn remove_dead(g: &mut Graph) -> usize {
    let live: std::collections::HashSet<_> = g.topo_order(g.outputs()).into_iter().collect();
    let dead: Vec<_> = g
        .node_ids()
        .into_iter()
        .filter(|n| {
            !live.contains(n) && !matches!(g.op(*n), Op::Source(SourceOp::Input { .. } | SourceOp::Shared { .. }))
        })
        .collect();
    for &n in &dead {
        g.remove(n);
    }
    dead.len()
}

pub fn run(g: &mut Graph, log: &mut RewriteLog) -> Result<bool> {
    let n = remove_dead(g);
    for _ in 0..n {
        log.record("dead_code");
    }
    Ok(n > 0)
}
