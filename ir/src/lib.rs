//! kiln-ir: what every op means and how graphs are transformed. Types and dims (`types`), runtime
//! values (`tensor`), the closed op set in families (`ops`, each op's type rule, gradient and
//! reference semantics side by side), the graph (`graph`, `build`), reverse-mode differentiation
//! (`grad`), the rewrite pipeline (`passes`), shape specialization (`specialize`) and printing
//! (`print`). It depends on no code generator and can be read and tested alone.

pub mod build;
pub mod error;
pub mod grad;
pub mod graph;
pub mod ops;
pub mod passes;
pub mod print;
pub mod specialize;
pub mod tensor;
pub mod types;

pub use error::{At, Error, Loc, Result};
pub use graph::{Graph, Node, NodeId};
pub use ops::Op;
pub use tensor::Tensor;
pub use types::{DType, Dim, TensorType};
