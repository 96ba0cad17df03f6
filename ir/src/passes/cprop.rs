//! Constant folding: a node whose operands are all constants (and whose shape is fixed and modest) is
//! replaced by its value, computed with the reference semantics. `size_of` folds as soon as the axes
//! it counts are fixed. Random nodes never fold: their value changes every call.

use super::RewriteLog;
use crate::error::Result;
use crate::graph::Graph;
use crate::ops::{Op, SourceOp};
use crate::tensor::Tensor;

/// Larger results stay computed at run time rather than embedded in the program.
const MAX_FOLDED_ELEMENTS: usize = 1 << 16;

pub fn run(g: &mut Graph, log: &mut RewriteLog) -> Result<bool> {
    let mut changed = false;
    for n in g.topo_order(g.outputs()) {
        let node = g.node(n);
        let value = match &node.op {
            Op::Source(_) | Op::Random(_) => continue,
            Op::SizeOf { axes, dtype } => {
                let shape = &g.ty(node.inputs[0]).shape;
                let dims: Option<Vec<usize>> = axes.iter().map(|&a| shape[a].fixed()).collect();
                match dims {
                    Some(d) => Tensor::scalar(*dtype, d.iter().product::<usize>() as f64),
                    None => continue,
                }
            }
            op => {
                let Some(shape) = node.ty.concrete() else {
                    continue;
                };
                if shape.iter().product::<usize>() > MAX_FOLDED_ELEMENTS {
                    continue;
                }
                let consts: Option<Vec<&Tensor>> = node.inputs.iter().map(|&i| g.op(i).as_constant()).collect();
                let Some(consts) = consts else { continue };
                match op.eval(&consts, &node.ty) {
                    Ok(v) => v,
                    Err(_) => continue, // leave it for run time, where the error is reported
                }
            }
        };
        let at = g.node(n).at;
        let c = g.add(Op::Source(SourceOp::Constant(std::sync::Arc::new(value))), &[], at)?;
        g.replace_all_uses(n, c);
        log.record("constant_fold");
        changed = true;
    }
    if changed {
        super::dce::remove_dead(g);
    }
    Ok(changed)
}
