//! kiln-codegen: turns an optimized graph into something that runs. A `Program` is a graph with its
//! outputs set and its sources listed in call order; a `Backend` compiles it into an `Executable`
//! that is specialized on the concrete shapes of each call and cached per shape signature. This
//! crate holds the reference interpreter, the oracle every other backend is tested against.

mod bytes;
pub mod cpu;
pub mod cuda;
pub mod kernel;
mod profile;
pub use profile::{Profile, ProfiledStep};
pub mod reference;
mod shared;

pub use shared::{with_host_values, Resident, SharedValue};

use kiln_ir::{Graph, NodeId, Result, Tensor};

/// A graph ready to compile: `inputs` and `shared` are its Input and Shared nodes in the order their
/// values are passed to `Executable::run`. `updates` pairs an index into the graph's outputs with an
/// index into `shared`: that output is the shared variable's new value. The other outputs are what
/// `run` returns, in order.
#[derive(Clone, Debug)]
pub struct Program {
    pub graph: Graph,
    pub inputs: Vec<NodeId>,
    pub shared: Vec<NodeId>,
    pub updates: Vec<(usize, usize)>,
    /// Symbolic sizes fixed when the program was made (a given that replaced an input with a
    /// symbolic size by a value of fixed shape binds that size).
    pub known: kiln_ir::specialize::Bindings,
}

impl Program {
    /// Indices of the graph's outputs that are returned (not updates).
    pub fn returned(&self) -> Vec<usize> {
        (0..self.graph.outputs().len()).filter(|o| !self.updates.iter().any(|u| u.0 == *o)).collect()
    }
}

/// What a compile fixes for every specialization of its function, beyond the program: for the
/// CUDA backends, what an autotune found (`cuda::autotune`). Other backends ignore it.
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// How the float products are computed, in place of the thread's or `KILN_CUDA_TILES`'s
    /// table (`None`: as those say).
    pub tile_table: Option<std::sync::Arc<cuda::TileTable>>,
    /// Kernels emitted and launched for programmatic dependent launch, as `KILN_CUDA_PDL=1` asks.
    pub dependent_launch: bool,
    /// Sliced tiles' slices as thread block clusters (`Some(true)`, as `KILN_CUDA_CLUSTERS=1`
    /// asks) or not (`Some(false)`, `KILN_CUDA_CLUSTERS=0`); `None`: as those and the card say.
    pub clusters: Option<bool>,
    /// The streams a step may spread over, as `KILN_CUDA_STREAMS` says (`None`: as that says).
    pub streams: Option<usize>,
    /// Products of up to this many multiply-adds join single-block runs, as `KILN_CUDA_RUN_MACS`
    /// says (`None`: as that says, else 2^16).
    pub run_macs: Option<usize>,
    /// Smaller products with longer dots than this are tiled, as `KILN_CUDA_DOT_DEPTH` says
    /// (`None`: as that says, else 64).
    pub dot_depth: Option<usize>,
    /// The products that go to cuBLAS through cuBLASLt (`Some(true)`, as `KILN_CUDA_LT=1` asks)
    /// or not (`Some(false)`); `None`: as that says.
    pub cublaslt: Option<bool>,
    /// Later groups over a tiled product's rows joined at the end of its kernel (`Some(true)`) or
    /// each a kernel of its own (`Some(false)`, as `KILN_CUDA_ROW_TAIL=0` asks); `None`: as that says.
    pub row_tails: Option<bool>,
    /// The sections of a joined kernel taking its grid longest first (`Some(true)`) or in step
    /// order (`Some(false)`, as `KILN_CUDA_LONGEST_FIRST=0` asks); `None`: as that says.
    pub longest_first: Option<bool>,
    /// How many steps ahead a launch looks for launches to run beside it, as `KILN_CUDA_LOOKAHEAD`
    /// says (`None`: as that says, else 64).
    pub lookahead: Option<usize>,
    /// Launches that would hold up a kernel the step waits for joining it anyway (`Some(true)`,
    /// as `KILN_CUDA_CHAIN_JOINS=1` asks) or kept out of it (`Some(false)`); `None`: as that says,
    /// else kept out where the step runs on several streams.
    pub chain_joins: Option<bool>,
    /// Slabs copied 16 bytes a copy where their layout allows (`Some(true)`: operands contiguous
    /// along a tile's side, and left operands contiguous along the slab, those then staged a row
    /// of the tile after another) or a word at a time (`Some(false)`, as `KILN_CUDA_QUAD_COPIES=0`
    /// asks); `None`: as that says, else by quads.
    pub quad_copies: Option<bool>,
    /// Unsliced tiles whose slabs are copied asynchronously take slabs twice their shape's depth
    /// where the inner dimension allows (`Some(true)`) or keep the shape's (`Some(false)`, as
    /// `KILN_CUDA_DEEP_SLABS=0` asks); `None`: as that says, else deep.
    pub deep_slabs: Option<bool>,
    /// Tiles computed on tensor cores (3xTF32) where no tile choice says (`Some(true)`, as
    /// `KILN_CUDA_TF32X3=1` asks) or by float32 FMAs (`Some(false)`); `None`: as that says, else
    /// by FMAs.
    pub tensor_cores: Option<bool>,
    /// Every tile's slab loop in passes of turns (`Some(true)`, as `KILN_CUDA_TURN_PASSES=1` asks)
    /// or in single turns (`Some(false)`, `KILN_CUDA_TURN_PASSES=0`); `None`: as that says, else in
    /// passes on tensor cores only.
    pub turn_passes: Option<bool>,
}

/// Moves each update output into its shared variable (after checking it keeps the variable's
/// shape) and returns the other outputs: the update step of a backend that computes every output
/// into fresh tensors first.
pub fn apply_updates(program: &Program, outputs: Vec<Tensor>, shared: &mut [Tensor]) -> Result<Vec<Tensor>> {
    let mut slots: Vec<Option<Tensor>> = outputs.into_iter().map(Some).collect();
    for &(o, s) in &program.updates {
        let new = slots[o].take().expect("each output updates at most one variable");
        if new.shape() != shared[s].shape() || new.dtype() != shared[s].dtype() {
            return Err(kiln_ir::Error::Invalid(format!(
                "an update would change a shared variable from {} to {}",
                shared[s].ty(),
                new.ty()
            )));
        }
        shared[s] = new;
    }
    Ok(program.returned().into_iter().map(|o| slots[o].take().expect("returned outputs are not updates")).collect())
}

pub trait Backend {
    fn name(&self) -> &'static str;
    fn compile(&self, program: &Program, opts: &CompileOptions) -> Result<Box<dyn Executable>>;
    /// Does ahead, into the backend's caches, the slow part of what `compile` with `opts` and a
    /// first call with these shapes would do, without running anything; safe to call from several
    /// threads at once, so that many variants of a program are compiled on every core before they
    /// are run one by one (an autotune). Nothing to do where compiling is quick.
    fn precompile(&self, _program: &Program, _shapes: &[Vec<usize>], _opts: &CompileOptions) -> Result<()> {
        Ok(())
    }
}

pub trait Executable {
    /// Runs the program on values for its inputs and shared variables (in `Program` order, already
    /// checked against their declared types by the caller), returns the outputs that are not
    /// updates, and writes every update into its shared variable. All updates are computed from the
    /// values before the call (Theano's semantics), whichever way a backend writes them.
    /// A backend with its own memory may keep a variable's value resident there between calls.
    fn run(&mut self, inputs: &[&Tensor], shared: &mut [SharedValue]) -> Result<Vec<Tensor>>;
    /// Compiles the specialization for these input and shared-variable shapes without running it.
    fn prepare(&mut self, shapes: &[Vec<usize>]) -> Result<()>;
    /// The code this backend generated, for people and snapshot tests (empty for an interpreter).
    fn generated_code(&self) -> String;
    /// How long each specialization took to compile, one line each (empty where nothing is compiled
    /// out of process).
    fn compile_stats(&self) -> Vec<String> {
        vec![]
    }
    /// The time per step so far, where a profile was asked for (`KILN_CUDA_PROFILE=1`,
    /// `KILN_CPU_PROFILE=1`).
    fn profile(&self) -> Option<Profile> {
        None
    }
}
