//! The closed set of ops. `Op` is one enum grouped in families; each family's file holds, side by
//! side, every op's type/shape rule (`infer`), its vector-Jacobian product written with graph ops
//! (`vjp`, so that gradients of gradients work) and its reference semantics (`eval`). This module only
//! dispatches: adding a variant fails to compile in every `match` that does not handle it yet.

pub mod elementwise;
pub mod fused;
pub mod linalg;
pub mod movement;
pub mod nn;
pub mod random;
pub mod reduce;
pub mod source;

pub use elementwise::{BinaryOp, Scalar, UnaryOp};
pub use fused::{FusedKernel, ScalarExpr};
pub use movement::{MoveOp, SliceRange};
pub use nn::NnOp;
pub use random::{Distribution, RandomOp};
pub use reduce::ReduceOp;
pub use source::{SharedId, SourceOp};

use crate::graph::{Graph, NodeId};
use crate::tensor::Tensor;
use crate::types::TensorType;
use crate::Result;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Inputs, shared variables and constants.
    Source(SourceOp),
    Unary(UnaryOp),
    /// Binary elementwise op with numpy broadcasting.
    Binary(BinaryOp),
    /// `where(cond, a, b)`: Theano's switch, with broadcasting.
    Where,
    /// Reduction over a set of axes (sorted, unique).
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// The number of elements over `axes` of the input, as a scalar of the given float dtype: the
    /// divisor of `mean` and its gradient when those axes are symbolic.
    SizeOf {
        axes: Vec<usize>,
        dtype: crate::DType,
    },
    /// numpy's matmul for operands of rank >= 2, batch dims broadcast.
    MatMul,
    Movement(MoveOp),
    Nn(NnOp),
    Random(RandomOp),
    /// A fused elementwise region (optionally ending in a reduction), produced by the fusion pass.
    Fused(Arc<FusedKernel>),
}

impl Op {
    /// The type of this op's output for operands of the given types, or why they are not accepted.
    pub fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        let want = |n: usize| -> Result<(), String> {
            if inputs.len() == n {
                Ok(())
            } else {
                Err(format!("expects {n} operand(s), got {}", inputs.len()))
            }
        };
        match self {
            Op::Source(s) => {
                want(0)?;
                Ok(s.ty())
            }
            Op::Unary(u) => {
                want(1)?;
                elementwise::infer_unary(*u, inputs[0])
            }
            Op::Binary(b) => {
                want(2)?;
                elementwise::infer_binary(*b, inputs[0], inputs[1])
            }
            Op::Where => {
                want(3)?;
                elementwise::infer_where(inputs[0], inputs[1], inputs[2])
            }
            Op::Reduce { op, axes, keepdims } => {
                want(1)?;
                reduce::infer(*op, axes, *keepdims, inputs[0])
            }
            Op::SizeOf { axes, dtype } => {
                want(1)?;
                reduce::infer_size_of(axes, *dtype, inputs[0])
            }
            Op::MatMul => {
                want(2)?;
                linalg::infer_matmul(inputs[0], inputs[1])
            }
            Op::Movement(m) => movement::infer(m, inputs),
            Op::Nn(n) => nn::infer(n, inputs),
            Op::Random(r) => {
                want(1)?;
                random::infer(r, inputs[0])
            }
            Op::Fused(k) => k.infer(inputs),
        }
    }

    /// Reference semantics: the output for concrete operand values, `out` being the node's
    /// (specialized, fully fixed) type.
    pub fn eval(&self, inputs: &[&Tensor], out: &TensorType) -> Result<Tensor, String> {
        match self {
            Op::Source(s) => s.eval(),
            Op::Unary(u) => elementwise::eval_unary(*u, inputs[0], out),
            Op::Binary(b) => elementwise::eval_binary(*b, inputs[0], inputs[1], out),
            Op::Where => elementwise::eval_where(inputs, out),
            Op::Reduce { op, axes, keepdims } => reduce::eval(*op, axes, *keepdims, inputs[0], out),
            Op::SizeOf { axes, dtype } => reduce::eval_size_of(axes, *dtype, inputs[0]),
            Op::MatMul => linalg::eval_matmul(inputs[0], inputs[1], out),
            Op::Movement(m) => movement::eval(m, inputs, out),
            Op::Nn(n) => nn::eval(n, inputs, out),
            Op::Random(r) => random::eval(r, inputs[0], out),
            Op::Fused(k) => k.eval(inputs, out),
        }
    }

    /// The gradients of the node's inputs given the gradient `g` of its output; `None` for an input
    /// that receives no gradient (integer indices, random state). An op whose output is not
    /// differentiable returns an error.
    pub fn vjp(&self, graph: &mut Graph, node: NodeId, g: NodeId) -> Result<Vec<Option<NodeId>>> {
        match self {
            Op::Source(_) => Ok(vec![]),
            Op::Unary(u) => elementwise::vjp_unary(*u, graph, node, g),
            Op::Binary(b) => elementwise::vjp_binary(*b, graph, node, g),
            Op::Where => elementwise::vjp_where(graph, node, g),
            Op::Reduce { op, axes, keepdims } => reduce::vjp(*op, axes, *keepdims, graph, node, g),
            Op::SizeOf { .. } => Ok(vec![None]),
            Op::MatMul => linalg::vjp_matmul(graph, node, g),
            Op::Movement(m) => movement::vjp(m, graph, node, g),
            Op::Nn(n) => nn::vjp(n, graph, node, g),
            Op::Random(_) => Ok(vec![None]),
            Op::Fused(_) => Err(crate::Error::Grad {
                detail: "fused kernels are made after differentiation; differentiate the unoptimized graph".into(),
            }),
        }
    }

    /// A short name for printing and errors, with the op's attributes.
    pub fn label(&self) -> String {
        match self {
            Op::Source(s) => s.label(),
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name().to_string(),
            Op::Where => "where".into(),
            Op::Reduce { op, axes, keepdims } => {
                format!("{}{{axes={axes:?}{}}}", op.name(), if *keepdims { ",keepdims" } else { "" })
            }
            Op::SizeOf { axes, .. } => format!("size_of{{axes={axes:?}}}"),
            Op::MatMul => "matmul".into(),
            Op::Movement(m) => m.label(),
            Op::Nn(n) => n.label(),
            Op::Random(r) => r.label(),
            Op::Fused(k) => k.label(),
        }
    }

    /// Whether the op maps elements one to one with broadcasting (what elementwise fusion groups).
    pub fn is_elementwise(&self) -> bool {
        matches!(self, Op::Unary(_) | Op::Binary(_) | Op::Where)
    }

    pub fn as_constant(&self) -> Option<&Tensor> {
        match self {
            Op::Source(SourceOp::Constant(t)) => Some(t),
            _ => None,
        }
    }
}
