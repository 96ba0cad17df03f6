//! Programmatic dependent launch (`KILN_CUDA_PDL=1`; compute capability 9.0 or newer; opt-in
//! until timed on a GPU): each kernel is launched with the attribute that lets it start before
//! the kernel ahead of it on its stream has finished, and opens with `griddepcontrol.wait`, which
//! returns once every grid it depends on has completed and its memory is visible, then
//! `griddepcontrol.launch_dependents`, which lets the kernel after it be scheduled as soon as all
//! of this kernel's blocks are running. So a step's kernels keep the order and the memory
//! semantics of a plain stream (nothing is read or written before the wait), while the launch of
//! each (a few microseconds between two dependent kernels of a CUDA graph) overlaps the kernel
//! before it. In the emulator both instructions are nothing: it runs kernels one after another.

use super::ast::*;

/// The prelude's helper each kernel opens with.
pub(crate) const HELPER: &str = "kiln_dependent_launch";

thread_local! {
    static ASKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every CUDA program this thread specializes emitted (and, on a GPU, launched)
/// for programmatic dependent launch, as `KILN_CUDA_PDL=1` does.
pub fn with_dependent_launch<R>(f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&ASKED, true, f)
}

/// Whether kernels are emitted for programmatic dependent launch (and so launched: the runtime
/// follows the module, `uses`).
pub(super) fn requested() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    ASKED.with(|a| a.get()) || super::switch_from_env(&ON, "KILN_CUDA_PDL", "1")
}

/// Whether `module`'s kernels were emitted for programmatic dependent launch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn uses(module: &Module) -> bool {
    module.helpers.iter().any(|h| h.name == HELPER)
}

/// The helper: wait for the grids this one depends on, then let the next one launch.
pub(super) fn helper() -> DeviceFn {
    let instruction = |ptx, memory| Stmt::Asm {
        ptx,
        outputs: vec![],
        inputs: vec![],
        memory,
        emulated: call("kiln_emu_nothing", vec![]),
    };
    DeviceFn {
        ret: CType::Void,
        name: HELPER,
        params: vec![],
        outputs: 0,
        body: vec![
            // Nothing this kernel reads or writes may move above the wait.
            instruction("griddepcontrol.wait;", true),
            instruction("griddepcontrol.launch_dependents;", false),
        ],
    }
}

/// Opens every kernel with the helper and adds it to the prelude.
pub(super) fn prepare(module: &mut Module) {
    for k in &mut module.kernels {
        k.body.insert(0, Stmt::Call(call(HELPER, vec![])));
    }
    module.helpers.push(helper());
}
