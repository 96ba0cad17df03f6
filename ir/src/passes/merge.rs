//! Merge (common-subexpression elimination): two nodes with the same op and the same operands compute
//! the same value, so users of the later one read the earlier one. Operands are visited first, so
//! merged operands make their users mergeable in the same sweep. Random nodes merge only when they
//! share a stream, which makes them equal by construction.

use super::RewriteLog;
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::ops::{Op, SourceOp};
use std::collections::HashMap;

/// Constants larger than this are not compared element by element.
const MAX_CONSTANT_KEY: usize = 64;

pub fn run(g: &mut Graph, log: &mut RewriteLog) -> Result<bool> {
    let mut seen: HashMap<(String, Vec<NodeId>), NodeId> = HashMap::new();
    let mut changed = false;
    for n in g.topo_order(g.outputs()) {
        let op = g.op(n);
        let mergeable = match op {
            Op::Source(SourceOp::Constant(t)) => t.len() <= MAX_CONSTANT_KEY,
            Op::Source(_) => false,
            _ => true,
        };
        if !mergeable {
            continue;
        }
        // Debug formatting round-trips floats exactly, so equal keys mean equal ops.
        let key = (format!("{op:?}|{}", g.ty(n)), g.inputs(n).to_vec());
        match seen.get(&key) {
            Some(&first) => {
                g.replace_all_uses(n, first);
                log.record("merge");
                changed = true;
            }
            None => {
                seen.insert(key, n);
            }
        }
    }
    if changed {
        super::dce::remove_dead(g);
    }
    Ok(changed)
}
