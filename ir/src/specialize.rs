//! Shape specialization: given the concrete shapes of a program's inputs and shared variables, binds
//! every symbolic dim (the user's, and those derived by reshape, slice and concatenate) and returns a
//! copy of the graph in which every type and every op attribute is concrete. A size that does not
//! agree at run time (two dims that must be equal, an index range) is an error naming the node's
//! call site. Node ids are preserved.

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::ops::{MoveOp, Op, SourceOp};
use crate::types::{Dim, TensorType};
use std::collections::HashMap;
use std::sync::Arc;

pub type Bindings = HashMap<Arc<str>, usize>;

/// Binds the symbolic dims of `declared` to the sizes of `actual`; `Err` describes a conflict.
pub fn unify(declared: &[Dim], actual: &[usize], b: &mut Bindings) -> Result<(), String> {
    if declared.len() != actual.len() {
        return Err(format!("expected rank {}, got rank {}", declared.len(), actual.len()));
    }
    for (d, &a) in declared.iter().zip(actual) {
        match d {
            Dim::Fixed(n) if *n != a => return Err(format!("expected size {n}, got {a}")),
            Dim::Fixed(_) => {}
            Dim::Sym(s) => match b.get(s) {
                Some(&v) if v != a => {
                    return Err(format!("'{s}' is {v} elsewhere but {a} here"));
                }
                Some(_) => {}
                None => {
                    b.insert(s.clone(), a);
                }
            },
        }
    }
    Ok(())
}

fn resolve_dim(d: &Dim, b: &Bindings) -> Result<Dim, String> {
    match d {
        Dim::Fixed(_) => Ok(d.clone()),
        Dim::Sym(s) => {
            b.get(s).map(|&v| Dim::Fixed(v)).ok_or_else(|| format!("symbolic size '{s}' is not bound by any input"))
        }
    }
}
fn resolve_dims(ds: &[Dim], b: &Bindings) -> Result<Vec<Dim>, String> {
    ds.iter().map(|d| resolve_dim(d, b)).collect()
}

fn resolve_op(op: &Op, b: &Bindings) -> Result<Op, String> {
    Ok(match op {
        Op::Movement(MoveOp::Reshape(spec)) => Op::Movement(MoveOp::Reshape(
            spec.iter().map(|d| d.as_ref().map(|d| resolve_dim(d, b)).transpose()).collect::<Result<_, _>>()?,
        )),
        Op::Movement(MoveOp::BroadcastTo(s)) => Op::Movement(MoveOp::BroadcastTo(resolve_dims(s, b)?)),
        Op::Movement(MoveOp::SliceGrad { ranges, shape }) => {
            Op::Movement(MoveOp::SliceGrad { ranges: ranges.clone(), shape: resolve_dims(shape, b)? })
        }
        Op::Movement(MoveOp::TakeGrad { axis, size }) => {
            Op::Movement(MoveOp::TakeGrad { axis: *axis, size: resolve_dim(size, b)? })
        }
        Op::Random(r) => Op::Random(crate::ops::RandomOp { shape: resolve_dims(&r.shape, b)?, ..r.clone() }),
        Op::Source(SourceOp::Input { name, ty }) => Op::Source(SourceOp::Input {
            name: name.clone(),
            ty: TensorType::new(ty.dtype, resolve_dims(&ty.shape, b)?),
        }),
        Op::Source(SourceOp::Shared { id, name, ty }) => Op::Source(SourceOp::Shared {
            id: *id,
            name: name.clone(),
            ty: TensorType::new(ty.dtype, resolve_dims(&ty.shape, b)?),
        }),
        other => other.clone(),
    })
}

/// A copy of `g` specialized to the given source shapes (`shapes[n]` for each Input/Shared node `n`).
pub fn specialize(g: &Graph, shapes: &HashMap<NodeId, Vec<usize>>) -> Result<(Graph, Bindings)> {
    specialize_with(g, shapes, &Bindings::new())
}

/// `specialize` with sizes already known (e.g. from a given that replaced a symbolic input by a
/// value of fixed shape).
pub fn specialize_with(g: &Graph, shapes: &HashMap<NodeId, Vec<usize>>, known: &Bindings) -> Result<(Graph, Bindings)> {
    let mut b = known.clone();
    for (&n, s) in shapes {
        let name = g.node(n).op.label();
        unify(&g.ty(n).shape, s, &mut b).map_err(|detail| Error::Call { input: name, detail })?;
    }
    let mut out = g.clone();
    for n in g.topo_all() {
        let node = g.node(n);
        let fail = |detail: String| Error::Runtime { op: node.op.label(), detail, at: node.at };
        let op = resolve_op(&node.op, &b).map_err(fail)?;
        let tys: Vec<&TensorType> = node.inputs.iter().map(|&i| out.ty(i)).collect();
        let ty = op.infer(&tys).map_err(|e| {
            let operands: Vec<String> = tys.iter().map(|t| t.to_string()).collect();
            fail(format!("{e} (operands: {})", operands.join(", ")))
        })?;
        let concrete = ty.concrete().ok_or_else(|| fail(format!("type {ty} is not concrete after binding")))?;
        unify(&node.ty.shape, &concrete, &mut b)
            .map_err(|e| fail(format!("declared {} but computes {ty}: {e}", node.ty)))?;
        out.set_node(n, op, ty);
    }
    // Sizes are known now, so what was symbolic before (a broadcast to the batch size of a
    // constant, say the seed of a gradient) can be folded once here instead of computed every call.
    crate::passes::cprop::run(&mut out, &mut crate::passes::RewriteLog::default())?;
    Ok((out, b))
}
