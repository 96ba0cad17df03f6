//! Errors of every layer of kiln. Each error says which input or op it is about, what was expected,
//! what came, and — where a node is involved — the line of user code that created that node.

use std::fmt;

/// The user's call site of the API call that created a node (`#[track_caller]`).
pub type Loc = &'static std::panic::Location<'static>;

/// Formats a call site as `file:line:col`.
pub struct At(pub Loc);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.0.file(), self.0.line(), self.0.column())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// An op was applied to operands it does not accept (shape or dtype), found while building.
    #[error("{}: {op}: {detail}", At(at))]
    Type { op: String, detail: String, at: Loc },
    /// A function was called with an argument that does not match its declared input.
    #[error("input '{input}': {detail}")]
    Call { input: String, detail: String },
    /// A gradient was asked for that does not exist or cannot be built.
    #[error("grad: {detail}")]
    Grad { detail: String },
    /// A failure while running a compiled function, pointing at the node that failed.
    #[error("{}: {op}: {detail}", At(at))]
    Runtime { op: String, detail: String, at: Loc },
    /// A misuse of the API that is not tied to one node (e.g. mixing graphs, unknown inputs).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
