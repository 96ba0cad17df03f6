//! The CUDA backend: the kernel program printed as CUDA C (`emit` builds a typed AST, `print`
//! prints it), compiled by NVRTC at run time, run on one stream with cuBLAS for float products.
//! The runtime (`exec`, `runtime`, and NVRTC itself) needs the `cuda` feature (on by default);
//! without it the CUDA C is still generated, and `Device::Cuda` says the feature is off.
pub mod ast;
pub mod emit;
#[cfg(feature = "cuda")]
mod exec;
mod group;
pub mod nvrtc;
pub mod print;
mod reduce;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod scalar;
mod single;
mod special;

#[cfg(feature = "cuda")]
pub use exec::{CompileStats, Cuda, CudaExecutable};
#[cfg(feature = "cuda")]
pub use runtime::unavailable_reason;

#[cfg(not(feature = "cuda"))]
mod disabled {
    use crate::{Backend, CompileOptions, Executable, Program};
    use kiln_ir::{Error, Result};

    pub const REASON: &str = "kiln was built without its `cuda` feature";

    /// The CUDA backend (the `cuda` feature is off: compiling for it is an error).
    pub struct Cuda {
        pub ordinal: usize,
    }

    impl Backend for Cuda {
        fn name(&self) -> &'static str {
            "cuda"
        }
        fn compile(&self, _: &Program, _: &CompileOptions) -> Result<Box<dyn Executable>> {
            Err(Error::Invalid(format!("Device::Cuda({}) is not available: {REASON}", self.ordinal)))
        }
    }

    pub fn unavailable_reason() -> Option<String> {
        Some(REASON.into())
    }
}
#[cfg(not(feature = "cuda"))]
pub use disabled::{unavailable_reason, Cuda};

use crate::kernel::KernelProgram;
use kiln_ir::Result;

/// The CUDA C of a kernel program.
pub fn source(kp: &KernelProgram) -> Result<String> {
    let dp = emit::emit(kp, &crate::kernel::plan_memory(kp))?;
    Ok(print::module(&dp.module))
}

/// The kernel program the CUDA backend runs for these input and shared-variable shapes (updates
/// placed, bounds checked), and the shapes of the program's outputs.
pub fn specialize_program(
    program: &crate::Program,
    shapes: &[Vec<usize>],
) -> Result<(KernelProgram, Vec<crate::kernel::UpdateWrite>, Vec<Vec<usize>>)> {
    let sources = program.inputs.iter().chain(&program.shared);
    let bound = sources.zip(shapes).map(|(&n, s)| (n, s.clone())).collect();
    let (g, _) = kiln_ir::specialize::specialize_with(&program.graph, &bound, &program.known)?;
    let mut kp = crate::kernel::lower(&g, &program.inputs, &program.shared)?;
    let out_shapes = g.outputs().iter().map(|&o| g.ty(o).concrete().expect("specialized")).collect();
    let updates = crate::kernel::place_updates(&mut kp, &program.updates);
    crate::kernel::check_bounds(&kp)?;
    Ok((kp, updates, out_shapes))
}

/// The CUDA C the CUDA backend generates for a program called with these shapes (no GPU needed).
pub fn program_source(program: &crate::Program, shapes: &[Vec<usize>]) -> Result<String> {
    let (kp, _, _) = specialize_program(program, shapes)?;
    source(&kp)
}
