//! The CUDA backend: the kernel program printed as CUDA C (`emit` builds a typed AST, `print`
//! prints it), compiled by NVRTC at run time, run with cuBLAS for large float products on two
//! streams where the memory allows (`schedule`), each kernel launched so that it may start before
//! the one ahead of it finishes where asked (`dependent_launch`). Kernels are joined where that is safe (`group`,
//! `single`, `side`, and medium products computed in tiles by their epilogue's kernel: `tiled`,
//! on tensor cores when asked: `mma`, a tile's slices as a thread block cluster when asked:
//! `cluster`; or as a tile table measured on the card says: `tile_table`; groups over a tiled
//! product's rows at the end of its kernel: `row_tail`),
//! since a small step pays per launch. The runtime (`exec`, `runtime`, and NVRTC itself)
//! needs the `cuda` feature (on by default); without it the CUDA C is still generated, and
//! `Device::Cuda` says the feature is off. `emulator` runs the same program on the CPU, for tests.
pub mod ast;
pub mod autotune;
mod cluster;
mod dependent_launch;
mod dynamic_shared;
mod elementwise;
pub mod emit;
pub mod emulator;
#[cfg(feature = "cuda")]
mod exec;
mod group;
mod lt;
#[cfg(feature = "cuda")]
mod lt_runtime;
mod mma;
pub mod nvrtc;
pub mod print;
#[cfg(feature = "cuda")]
mod readback;
mod reduce;
mod row_tail;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod sass;
pub mod scalar;
pub mod schedule;
mod side;
mod single;
mod special;
mod tile_finish;
mod tile_plan;
mod tile_shape;
mod tile_staging;
mod tile_table;
mod tiled;
pub use cluster::{with_cluster_setting, with_clusters};
pub use dependent_launch::{with_dependent_launch, with_late_dependent_launch};
pub use lt::{with_cublaslt, LtEpilogue, LtGemm};
pub use row_tail::with_row_tails;
pub use side::{with_chain_joins, with_clusters_first, with_longest_first};
pub use tile_plan::{
    with_deep_slabs, with_nearest_slices, with_split_ahead, with_tensor_core_shared, with_tensor_cores,
};
pub use tile_staging::with_quad_copies;
pub use tile_table::{with_tile_table, ProductKey, TileTable};
pub use tiled::{with_tile_choice, with_turn_passes, TileChoice, TileShape};

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

thread_local! {
    static KERNEL_BY_KERNEL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static STREAMS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// Size bounds set for this thread, by the environment variable that would set them.
    static BOUNDS: std::cell::RefCell<Vec<(&'static str, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Switches set for this thread (`Switch::with`), by the environment variable that would set them.
    static SWITCHES: std::cell::RefCell<Vec<(&'static str, bool)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An on/off choice of how code is generated (`KILN_CUDA_LT`, `KILN_CUDA_ROW_TAIL`, ...): what this
/// thread set (`with`, innermost first), else the environment variable's `1` (on) or `0` (off),
/// read once, else the default.
pub(crate) struct Switch {
    var: &'static str,
    default: bool,
    env: std::sync::OnceLock<Option<bool>>,
}

impl Switch {
    pub(crate) const fn new(var: &'static str, default: bool) -> Switch {
        Switch { var, default, env: std::sync::OnceLock::new() }
    }

    pub(crate) fn on(&self) -> bool {
        self.set().unwrap_or(self.default)
    }

    /// What this thread's setting (`with`), else the environment, says, if either says anything:
    /// for a switch whose default depends on what it applies to.
    pub(crate) fn set(&self) -> Option<bool> {
        let set = SWITCHES.with(|s| s.borrow().iter().rev().find(|(var, _)| *var == self.var).map(|s| s.1));
        set.or_else(|| {
            *self.env.get_or_init(|| match std::env::var(self.var).as_deref() {
                Ok("1") => Some(true),
                Ok("0") => Some(false),
                _ => None,
            })
        })
    }

    /// Runs `f` with this switch `on` or off for every CUDA program this thread specializes,
    /// whatever the environment says.
    pub(crate) fn with<R>(&self, on: bool, f: impl FnOnce() -> R) -> R {
        with_switches(&[(self, on)], f)
    }
}

/// Runs `f` with each of `switches` set as it says (see `Switch::with`).
fn with_switches<R>(switches: &[(&Switch, bool)], f: impl FnOnce() -> R) -> R {
    SWITCHES.with(|s| s.borrow_mut().extend(switches.iter().map(|(switch, on)| (switch.var, *on))));
    let r = f();
    SWITCHES.with(|s| {
        let mut s = s.borrow_mut();
        let kept = s.len() - switches.len();
        s.truncate(kept);
    });
    r
}

/// Whether a step's returned outputs and its error word share one egress, copied back at once,
/// the word cleared by the host only when dirty (`readback`): by `with_egress`, else unless
/// `KILN_CUDA_EGRESS=0`.
pub(crate) static EGRESS: Switch = Switch::new("KILN_CUDA_EGRESS", true);

/// Runs `f` with returned outputs and the error word in one egress (`on`), or each output in its
/// own slot, copied back on its own, and the word cleared inside the step (as before), for every
/// CUDA program this thread specializes, whatever the environment says.
pub fn with_egress<R>(on: bool, f: impl FnOnce() -> R) -> R {
    EGRESS.with(on, f)
}

/// The size bound that `KILN_CUDA_RUN_MACS` sets: products of up to this many multiply-adds join
/// single-block runs.
pub const RUN_MACS_VAR: &str = "KILN_CUDA_RUN_MACS";
/// The size bound that `KILN_CUDA_DOT_DEPTH` sets: smaller products with longer dots are tiled.
pub const DOT_DEPTH_VAR: &str = "KILN_CUDA_DOT_DEPTH";
/// The reach that `KILN_CUDA_LOOKAHEAD` sets: how many steps ahead a launch looks for launches
/// to run beside it.
pub const LOOKAHEAD_VAR: &str = "KILN_CUDA_LOOKAHEAD";

/// Runs `f` with the size bound that the environment variable `var` sets at `value` for every CUDA
/// program this thread specializes, whatever the environment says.
pub fn with_bound<R>(var: &'static str, value: usize, f: impl FnOnce() -> R) -> R {
    with_bounds(&[(var, value)], f)
}

/// Runs `f` with each of `bounds` set as `with_bound` sets one.
fn with_bounds<R>(bounds: &[(&'static str, usize)], f: impl FnOnce() -> R) -> R {
    BOUNDS.with(|b| b.borrow_mut().extend_from_slice(bounds));
    let r = f();
    BOUNDS.with(|b| {
        let mut b = b.borrow_mut();
        let kept = b.len() - bounds.len();
        b.truncate(kept);
    });
    r
}

/// Runs `f` with every CUDA program this thread compiles planned for `streams` streams, as
/// `KILN_CUDA_STREAMS` would (for tests: the emulator's race check then holds the steps to the
/// dependencies those streams follow).
pub fn with_streams<R>(streams: usize, f: impl FnOnce() -> R) -> R {
    with_thread_setting(&STREAMS, Some(streams), f)
}

/// For tests: runs `f` with every CUDA program that this thread specializes emitted kernel by
/// kernel: each kernel on its own, in the form large inputs get (no single-block step or runs, no
/// kernels side by side, no product inside its epilogue), so that the small inputs of an op table
/// or a gradient check exercise the multi-block kernels too. `KILN_CUDA_JOIN=0` does the same for
/// the whole process (to measure what joining kernels saves).
pub fn kernel_by_kernel<R>(f: impl FnOnce() -> R) -> R {
    with_thread_setting(&KERNEL_BY_KERNEL, true, f)
}

thread_local! {
    static TARGET: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every CUDA program this thread emits generated for the card of architecture
/// `arch` (`sm_90`, or `compute_90` for PTX): what kiln does by default where a card allows it
/// (sliced tiles as thread block clusters from 9.0, slabs copied asynchronously from 8.0) follows
/// it. The runtime sets it around each build; code printed without one is for `nvrtc::CHECK_ARCH`.
pub fn with_target_arch<R>(arch: &'static str, f: impl FnOnce() -> R) -> R {
    with_thread_setting(&TARGET, Some(arch), f)
}

/// The compute capability the code this thread emits is for (`capability_of` its target).
pub(crate) fn target_capability() -> u32 {
    capability_of(TARGET.with(|t| t.get()).unwrap_or(nvrtc::CHECK_ARCH))
}

/// The compute capability of an NVRTC architecture (`sm_90`, `compute_90`), as 10 * major + minor.
pub(crate) fn capability_of(arch: &str) -> u32 {
    arch.rsplit('_').next().and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Runs `f` with this thread's `setting` at `value`, then puts back what it was (the scoped
/// switches that tests and benchmarks use: kernel by kernel, a tile choice, the emulator's schedule).
pub(crate) fn with_thread_setting<T: Copy + 'static, R>(
    setting: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    let before = setting.with(|s| s.replace(value));
    let r = f();
    setting.with(|s| s.set(before));
    r
}

/// Runs `f` (a specialization's build, or printing one) under what `opts` fixes for a compiled
/// function: its tile table, programmatic dependent launch, clusters, streams, size bounds,
/// cuBLASLt, row tails, the order of joined sections, the joins' reach, whether launches may
/// hold up the kernels they join, quad copies, deep slabs, tensor cores and passes of turns,
/// where it fixes them.
pub fn with_compile_options<R>(opts: &crate::CompileOptions, f: impl FnOnce() -> R) -> R {
    let f = || if opts.dependent_launch { with_dependent_launch(f) } else { f() };
    let f = || match opts.clusters {
        Some(on) => cluster::with_cluster_setting(on, f),
        None => f(),
    };
    let f = || match opts.streams {
        Some(n) => with_streams(n, f),
        None => f(),
    };
    let switches: Vec<(&Switch, bool)> = [
        (&lt::CUBLASLT, opts.cublaslt),
        (&row_tail::ROW_TAILS, opts.row_tails),
        (&side::LONGEST_FIRST, opts.longest_first),
        (&side::CHAIN_JOINS, opts.chain_joins),
        (&tile_staging::QUAD_COPIES, opts.quad_copies),
        (&tile_plan::DEEP_SLABS, opts.deep_slabs),
        (&tile_plan::TENSOR_CORES, opts.tensor_cores),
        (&tiled::TURN_PASSES, opts.turn_passes),
    ]
    .into_iter()
    .filter_map(|(switch, on)| Some((switch, on?)))
    .collect();
    let bounds: Vec<(&'static str, usize)> =
        [(RUN_MACS_VAR, opts.run_macs), (DOT_DEPTH_VAR, opts.dot_depth), (LOOKAHEAD_VAR, opts.lookahead)]
            .into_iter()
            .filter_map(|(var, n)| Some((var, n?)))
            .collect();
    let f = || with_switches(&switches, || with_bounds(&bounds, f));
    match &opts.tile_table {
        Some(table) => tile_table::with_shared_tile_table(table.clone(), f),
        None => f(),
    }
}

/// Whether the environment variable `var` is set to `value` (a switch), read once into `cell`.
pub(crate) fn switch_from_env(cell: &'static std::sync::OnceLock<bool>, var: &str, value: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).is_ok_and(|v| v == value))
}

/// Which of `choices` the environment variable `var` names (its value, then what it means), read
/// once into `cell`; `None` where it is unset or names none.
pub(crate) fn choice_from_env<T: Copy + Send + Sync>(
    cell: &'static std::sync::OnceLock<Option<T>>,
    var: &str,
    choices: &[(&str, T)],
) -> Option<T> {
    *cell.get_or_init(|| {
        let value = std::env::var(var).ok()?;
        choices.iter().find(|(name, _)| *name == value).map(|&(_, choice)| choice)
    })
}

/// A size bound that the environment variable `var` may set (to measure another on a card), read
/// once into `cell`; `default` where it is unset or not a number; what `with_bound` set on this
/// thread before either.
pub(crate) fn bound_from_env(cell: &'static std::sync::OnceLock<usize>, var: &str, default: usize) -> usize {
    if let Some(v) = BOUNDS.with(|b| b.borrow().iter().rev().find(|(name, _)| *name == var).map(|b| b.1)) {
        return v;
    }
    *cell.get_or_init(|| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

/// Whether `kernel_by_kernel` (or `KILN_CUDA_JOIN=0`) is in force on this thread.
pub(crate) fn kernel_by_kernel_forced() -> bool {
    static NO_JOIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    KERNEL_BY_KERNEL.with(|k| k.get()) || switch_from_env(&NO_JOIN, "KILN_CUDA_JOIN", "0")
}

/// Temporaries get memory of their own (no slot shared with an earlier temporary) while they need
/// at most this many bytes in all: a step then waits for another only for its data, so more
/// kernels can run side by side (fmnist-mlp one launch fewer); larger programs reuse slots.
const OWN_MEMORY_BYTES: usize = 256 << 20;

/// `KILN_CUDA_STREAMS`: how many streams a step's independent steps may spread over (`None`: not
/// set, `streams_and_memory` picks). The emulator plans memory for them too, so that its race
/// check sees the dependencies those streams would follow.
pub(crate) fn streams_requested() -> Result<Option<usize>> {
    if let Some(n) = STREAMS.with(|s| s.get()) {
        return Ok(Some(n.clamp(1, 8)));
    }
    match std::env::var("KILN_CUDA_STREAMS") {
        Err(_) => Ok(None),
        Ok(v) => match v.parse::<usize>() {
            Ok(n @ 1..=8) => Ok(Some(n)),
            _ => {
                Err(kiln_ir::Error::Invalid(format!("KILN_CUDA_STREAMS={v}: expected a number of streams from 1 to 8")))
            }
        },
    }
}

/// The streams `kp` runs on and its memory plan for them. Streams: as requested, else two where
/// its temporaries fit in memory of their own (`OWN_MEMORY_BYTES`), else one. On an H100, two
/// streams took fmnist-mlp-4k from 0.231 to 0.223 ms a step and the autoencoder from 0.277 to
/// 0.253 (the others within noise, twice); a larger program keeps one, so that its temporaries
/// can share memory. Steps spread over several streams always get memory of their own.
pub(crate) fn streams_and_memory(kp: &KernelProgram, requested: Option<usize>) -> (usize, crate::kernel::MemoryPlan) {
    let own = crate::kernel::plan_memory_with(kp, false);
    let fits = own.slot_bytes.iter().sum::<usize>() <= OWN_MEMORY_BYTES;
    let streams = requested.unwrap_or(if fits { 2 } else { 1 });
    if streams > 1 || fits {
        (streams, own)
    } else {
        (streams, crate::kernel::plan_memory_with(kp, true))
    }
}

/// The memory plan of the CUDA backend's program when it runs on `streams` streams.
pub(crate) fn memory_plan(kp: &KernelProgram, streams: usize) -> crate::kernel::MemoryPlan {
    streams_and_memory(kp, Some(streams)).1
}

/// The CUDA C of a kernel program.
pub fn source(kp: &KernelProgram) -> Result<String> {
    let dp = emit::emit(kp, &memory_plan(kp, 1))?;
    Ok(print::program(&dp.module, &dp.steps))
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
    schedule::sink_unread_results(&mut kp);
    crate::kernel::check_bounds(&kp)?;
    Ok((kp, updates, out_shapes))
}

/// The float products of a program called with these shapes that a tile table can direct
/// (`TileTable`), with their kernels' names, in program order.
pub fn program_products(program: &crate::Program, shapes: &[Vec<usize>]) -> Result<Vec<(String, ProductKey)>> {
    let (kp, _, _) = specialize_program(program, shapes)?;
    Ok(tile_table::tunable_products(&kp))
}

/// The CUDA kernels the CUDA backend compiles for a program called with these shapes.
pub fn program_module(program: &crate::Program, shapes: &[Vec<usize>]) -> Result<ast::Module> {
    let (kp, _, _) = specialize_program(program, shapes)?;
    Ok(emit::emit(&kp, &memory_plan(&kp, 1))?.module)
}

/// The CUDA C the CUDA backend generates for a program called with these shapes (no GPU needed).
pub fn program_source(program: &crate::Program, shapes: &[Vec<usize>]) -> Result<String> {
    let (kp, _, _) = specialize_program(program, shapes)?;
    source(&kp)
}

/// Checks the indices that come from arguments (takes and their gradients reading an input) against
/// their axis, before anything runs: such an index can only be checked on the host.
pub(crate) fn check_argument_indices(kp: &KernelProgram, inputs: &[&kiln_ir::Tensor]) -> Result<()> {
    use crate::kernel::{BufKind, Step};
    for step in &kp.steps {
        let (Step::Gather(g) | Step::ScatterAdd(g)) = step else { continue };
        if let BufKind::Input(k) = kp.buffers[g.idx].kind {
            let op = if matches!(step, Step::Gather(_)) { "take" } else { "take_grad" };
            for i in inputs[k].to_i64_vec() {
                let j = if i < 0 { i + g.axis_len as i64 } else { i };
                if j < 0 || j >= g.axis_len as i64 {
                    return Err(kiln_ir::Error::Runtime {
                        op: op.into(),
                        detail: format!("index {i} out of range for an axis of size {}", g.axis_len),
                        at: g.at,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The error word's value before a step: every byte 0xff. Kernels lower it to their site's code
/// with `atomicMin`, so the earliest site in the program wins, as on the CPU.
pub(crate) const NO_ERROR: u32 = u32::MAX;

/// The error a step's error word reports (`NO_ERROR`: none; `k`: the `k`-th site of `errors`).
pub(crate) fn check_error_word(errors: &[emit::ErrorSite], code: u32) -> Result<()> {
    if code == NO_ERROR || code == 0 {
        return Ok(());
    }
    let site = &errors[code as usize - 1];
    Err(kiln_ir::Error::Runtime {
        op: site.op.into(),
        detail: format!("an index computed by the graph was out of range for an axis of size {}", site.axis_len),
        at: site.at,
    })
}

#[cfg(test)]
mod switch_tests {
    use super::*;

    static SETTLED: Switch = Switch::new("KILN_TEST_SWITCH_NEVER_SET", true);
    static OTHER: Switch = Switch::new("KILN_TEST_OTHER_SWITCH_NEVER_SET", false);

    #[test]
    fn the_innermost_setting_wins_and_each_is_undone_on_the_way_out() {
        assert!(SETTLED.on() && !OTHER.on(), "the defaults, the environment saying nothing");
        SETTLED.with(false, || {
            assert!(!SETTLED.on());
            with_switches(&[(&SETTLED, true), (&OTHER, true)], || assert!(SETTLED.on() && OTHER.on()));
            assert!(!SETTLED.on() && !OTHER.on());
        });
        assert!(SETTLED.on());
        with_bounds(&[(LOOKAHEAD_VAR, 3), (RUN_MACS_VAR, 5)], || {
            with_bound(LOOKAHEAD_VAR, 7, || {
                static CELL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
                assert_eq!(bound_from_env(&CELL, LOOKAHEAD_VAR, 0), 7);
            });
            static CELL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
            assert_eq!(bound_from_env(&CELL, RUN_MACS_VAR, 0), 5);
        });
    }
}
