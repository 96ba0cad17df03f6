//! kiln: a static computation-graph compiler for deep learning, in the style of Theano. Declare
//! symbolic tensors on a `Graph`, build expressions with operators and methods, take gradients with
//! `Graph::grad`, and compile a `Function` (inputs, outputs, updates of shared variables) for a
//! `Device`. The optimized graph can be printed (`debugprint`), drawn (`to_dot`), and explained
//! (`rewrite_log`). `use kiln::prelude::*` brings in everything a program needs.

pub mod autotune;
pub mod data;
pub mod function;
pub mod graph;
pub mod nn;
mod operators;
pub mod random;
pub mod testing;
pub mod var;
pub mod workloads;

pub use autotune::{AutotuneOptions, AutotuneReport};
pub use function::{Device, Function, FunctionBuilder};
pub use graph::Graph;
pub use kiln_codegen::{Profile, ProfiledStep};
pub use kiln_ir as ir;
pub use kiln_ir::grad::Disconnected;
pub use kiln_ir::ops::{BinaryOp, ReduceOp, UnaryOp};
pub use kiln_ir::passes::{OptimizeOptions, RewriteLog};
pub use kiln_ir::{DType, Dim, Error, Result, Tensor, TensorType};
pub use random::RandomStream;
pub use var::{concat, stack, where_, Operand, Var};

pub mod prelude {
    pub use crate::{
        concat, stack, where_, BinaryOp, Device, Dim, Disconnected, Function, Graph, RandomStream, ReduceOp, Tensor,
        UnaryOp, Var,
    };
    pub use kiln_ir::DType::{self, Bool, F32, F64, I32, I64};
    pub use ndarray::{array, Array, Array1, Array2, ArrayD, Axis};
}
