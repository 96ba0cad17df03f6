//! Small constructors over `Graph::add` for the code that writes graphs: gradients (VJPs), rewrite
//! rules and the user API. Each returns the new node or the type error of `Graph::add`.

use crate::error::{Loc, Result};
use crate::graph::{Graph, NodeId};
use crate::ops::{BinaryOp, MoveOp, Op, ReduceOp, SourceOp, UnaryOp};
use crate::tensor::Tensor;
use crate::types::{DType, Dim};
use std::sync::Arc;

impl Graph {
    pub fn constant(&mut self, value: Tensor, at: Loc) -> NodeId {
        self.add(Op::Source(SourceOp::Constant(Arc::new(value))), &[], at).expect("constants always type")
    }
    /// A 0-d constant of the given dtype.
    pub fn scalar(&mut self, dtype: DType, value: f64, at: Loc) -> NodeId {
        self.constant(Tensor::scalar(dtype, value), at)
    }
    /// A 0-d constant of the dtype of node `like`.
    pub fn scalar_like(&mut self, like: NodeId, value: f64, at: Loc) -> NodeId {
        let dtype = self.ty(like).dtype;
        self.scalar(dtype, value, at)
    }
    pub fn unary(&mut self, op: UnaryOp, x: NodeId, at: Loc) -> Result<NodeId> {
        self.add(Op::Unary(op), &[x], at)
    }
    pub fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId, at: Loc) -> Result<NodeId> {
        self.add(Op::Binary(op), &[a, b], at)
    }
    pub fn add2(&mut self, a: NodeId, b: NodeId, at: Loc) -> Result<NodeId> {
        self.binary(BinaryOp::Add, a, b, at)
    }
    pub fn sub2(&mut self, a: NodeId, b: NodeId, at: Loc) -> Result<NodeId> {
        self.binary(BinaryOp::Sub, a, b, at)
    }
    pub fn mul2(&mut self, a: NodeId, b: NodeId, at: Loc) -> Result<NodeId> {
        self.binary(BinaryOp::Mul, a, b, at)
    }
    pub fn div2(&mut self, a: NodeId, b: NodeId, at: Loc) -> Result<NodeId> {
        self.binary(BinaryOp::Div, a, b, at)
    }
    pub fn neg(&mut self, x: NodeId, at: Loc) -> Result<NodeId> {
        self.unary(UnaryOp::Neg, x, at)
    }
    /// `x * c` for a scalar constant `c` of x's dtype.
    pub fn scale(&mut self, x: NodeId, c: f64, at: Loc) -> Result<NodeId> {
        let k = self.scalar_like(x, c, at);
        self.mul2(x, k, at)
    }
    pub fn cast(&mut self, x: NodeId, dtype: DType, at: Loc) -> Result<NodeId> {
        if self.ty(x).dtype == dtype {
            return Ok(x);
        }
        self.unary(UnaryOp::Cast(dtype), x, at)
    }
    pub fn where_(&mut self, c: NodeId, a: NodeId, b: NodeId, at: Loc) -> Result<NodeId> {
        self.add(Op::Where, &[c, a, b], at)
    }
    pub fn reduce(&mut self, op: ReduceOp, x: NodeId, axes: &[usize], keepdims: bool, at: Loc) -> Result<NodeId> {
        let mut axes = axes.to_vec();
        axes.sort_unstable();
        axes.dedup();
        self.add(Op::Reduce { op, axes, keepdims }, &[x], at)
    }
    pub fn sum(&mut self, x: NodeId, axes: &[usize], keepdims: bool, at: Loc) -> Result<NodeId> {
        self.reduce(ReduceOp::Sum, x, axes, keepdims, at)
    }
    pub fn matmul(&mut self, a: NodeId, b: NodeId, at: Loc) -> Result<NodeId> {
        self.add(Op::MatMul, &[a, b], at)
    }
    pub fn movement(&mut self, m: MoveOp, inputs: &[NodeId], at: Loc) -> Result<NodeId> {
        self.add(Op::Movement(m), inputs, at)
    }
    pub fn reshape(&mut self, x: NodeId, shape: Vec<Option<Dim>>, at: Loc) -> Result<NodeId> {
        self.movement(MoveOp::Reshape(shape), &[x], at)
    }
    /// Reshapes `x` to exactly the given dims.
    pub fn reshape_to(&mut self, x: NodeId, shape: &[Dim], at: Loc) -> Result<NodeId> {
        if self.ty(x).shape == shape {
            return Ok(x);
        }
        self.reshape(x, shape.iter().cloned().map(Some).collect(), at)
    }
    pub fn permute(&mut self, x: NodeId, perm: Vec<usize>, at: Loc) -> Result<NodeId> {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.movement(MoveOp::Permute(perm), &[x], at)
    }
    /// Swaps the last two axes.
    pub fn transpose_last2(&mut self, x: NodeId, at: Loc) -> Result<NodeId> {
        let r = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permute(x, perm, at)
    }
    pub fn broadcast_to(&mut self, x: NodeId, shape: &[Dim], at: Loc) -> Result<NodeId> {
        if self.ty(x).shape == shape {
            return Ok(x);
        }
        self.movement(MoveOp::BroadcastTo(shape.to_vec()), &[x], at)
    }

    /// Sums a gradient `g` (of a broadcast result) back to `shape`, the operand's shape before
    /// broadcasting: over the leading axes it lacked and over its axes of static size 1.
    pub fn sum_to(&mut self, g: NodeId, shape: &[Dim], at: Loc) -> Result<NodeId> {
        let gshape = self.ty(g).shape.clone();
        if gshape == shape {
            return Ok(g);
        }
        let lead = gshape.len() - shape.len();
        let lead_axes: Vec<usize> = (0..lead).collect();
        let mut x = if lead > 0 { self.sum(g, &lead_axes, false, at)? } else { g };
        let ones: Vec<usize> = (0..shape.len()).filter(|&i| shape[i].is_one() && !gshape[lead + i].is_one()).collect();
        if !ones.is_empty() {
            x = self.sum(x, &ones, true, at)?;
        }
        // Symbolic dims that met fixed ones resolve to the same sizes at run time: make the types equal.
        if self.ty(x).shape != shape {
            x = self.reshape_to(x, shape, at)?;
        }
        Ok(x)
    }
}
