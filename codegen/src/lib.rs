//! kiln-codegen: turns an optimized graph into something that runs. A `Program` is a graph with its
//! outputs set and its sources listed in call order; a `Backend` compiles it into an `Executable`
//! that is specialized on the concrete shapes of each call and cached per shape signature. This
//! crate holds the reference interpreter, the oracle every other backend is tested against.

pub mod cpu;
pub mod kernel;
pub mod reference;

use kiln_ir::{Graph, NodeId, Result, Tensor};

/// A graph ready to compile: `inputs` and `shared` are its Input and Shared nodes in the order their
/// values are passed to `Executable::run`; the graph's outputs are what `run` returns.
#[derive(Clone, Debug)]
pub struct Program {
    pub graph: Graph,
    pub inputs: Vec<NodeId>,
    pub shared: Vec<NodeId>,
}

#[derive(Clone, Debug, Default)]
pub struct CompileOptions {}

pub trait Backend {
    fn name(&self) -> &'static str;
    fn compile(&self, program: &Program, opts: &CompileOptions) -> Result<Box<dyn Executable>>;
}

pub trait Executable {
    /// Runs the program on values for its inputs and shared variables (in `Program` order, already
    /// checked against their declared types by the caller) and returns its outputs.
    fn run(&mut self, inputs: &[&Tensor], shared: &[&Tensor]) -> Result<Vec<Tensor>>;
    /// Compiles the specialization for these input and shared-variable shapes without running it.
    fn prepare(&mut self, shapes: &[Vec<usize>]) -> Result<()>;
    /// The code this backend generated, for people and snapshot tests (empty for an interpreter).
    fn generated_code(&self) -> String;
}
