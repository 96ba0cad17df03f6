//! Programmatic dependent launch (`KILN_CUDA_PDL=1`; compute capability 9.0 or newer; opt-in
//! until timed on a GPU): each kernel is launched with the attribute that lets it start before
//! the kernel ahead of it on its stream has finished, and opens with `griddepcontrol.wait`, which
//! returns once every grid it depends on has completed and its memory is visible, then
//! `griddepcontrol.launch_dependents`, which lets the kernel after it be scheduled as soon as all
//! of this kernel's blocks are running. So a step's kernels keep the order and the memory
//! semantics of a plain stream (nothing is read or written before the wait), while the launch of
//! each (a few microseconds between two dependent kernels of a CUDA graph) overlaps the kernel
//! before it. In the emulator both instructions are nothing: it runs kernels one after another.
//!
//! `KILN_CUDA_PDL=late` lets the next kernel launch only at the end of each block instead (the
//! kernel closes with `griddepcontrol.launch_dependents`; a block that returns early counts as
//! having let it): the next kernel's blocks then do not sit waiting on SM slots while this one
//! runs, slots that the kernels of a step's other stream could use (in one run on the H100 on
//! 2026-11-28, the early form took the autoencoder's two-stream step from 0.211 to 0.250 ms, and
//! fmnist-mlp's from 0.052 to 0.047). Opt-in until timed.

use super::ast::*;

/// The prelude's helper each kernel opens with.
pub(crate) const HELPER: &str = "kiln_dependent_launch";

/// The prelude's helper a kernel closes with where the next kernel launches late.
const TRIGGER_HELPER: &str = "kiln_launch_dependents";

/// Where a kernel lets the next one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Trigger {
    /// Right after its wait: the next kernel's blocks may be scheduled as soon as all of this
    /// kernel's are running (`KILN_CUDA_PDL=1`).
    Early,
    /// At the end of each block (`KILN_CUDA_PDL=late`).
    Late,
}

thread_local! {
    static ASKED: std::cell::Cell<Option<Trigger>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every CUDA program this thread specializes emitted (and, on a GPU, launched)
/// for programmatic dependent launch, as `KILN_CUDA_PDL=1` does.
pub fn with_dependent_launch<R>(f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&ASKED, Some(Trigger::Early), f)
}

/// The same with the next kernel let launch at the end of each block, as `KILN_CUDA_PDL=late`
/// does.
pub fn with_late_dependent_launch<R>(f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&ASKED, Some(Trigger::Late), f)
}

/// Whether kernels are emitted for programmatic dependent launch (and so launched: the runtime
/// follows the module, `uses`), and where they let the next launch.
pub(super) fn requested() -> Option<Trigger> {
    static ENV: std::sync::OnceLock<Option<Trigger>> = std::sync::OnceLock::new();
    let env = super::choice_from_env(&ENV, "KILN_CUDA_PDL", &[("1", Trigger::Early), ("late", Trigger::Late)]);
    ASKED.with(|a| a.get()).or(env)
}

/// Whether `module`'s kernels were emitted for programmatic dependent launch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn uses(module: &Module) -> bool {
    module.helpers.iter().any(|h| h.name == HELPER)
}

fn instruction(ptx: &'static str, memory: bool) -> Stmt {
    Stmt::Asm { ptx, outputs: vec![], inputs: vec![], memory, emulated: call("kiln_emu_nothing", vec![]) }
}

fn helper_of(name: &'static str, body: Vec<Stmt>) -> DeviceFn {
    DeviceFn { ret: CType::Void, name, params: vec![], outputs: 0, body }
}

/// Opens every kernel with the helper that waits for the grids it depends on (and, launching
/// early, then lets the next one launch), closes each with the trigger where it launches late,
/// and adds the helpers to the prelude.
pub(super) fn prepare(module: &mut Module, trigger: Trigger) {
    // Nothing this kernel reads or writes may move above the wait.
    let mut opening = vec![instruction("griddepcontrol.wait;", true)];
    if trigger == Trigger::Early {
        opening.push(instruction("griddepcontrol.launch_dependents;", false));
    }
    for k in &mut module.kernels {
        k.body.insert(0, Stmt::Call(call(HELPER, vec![])));
        if trigger == Trigger::Late {
            // After the block's last store (the helper's memory clobber keeps it there); the
            // next kernel's wait, not this, is what orders the memory.
            k.body.push(Stmt::Call(call(TRIGGER_HELPER, vec![])));
        }
    }
    module.helpers.push(helper_of(HELPER, opening));
    if trigger == Trigger::Late {
        module.helpers.push(helper_of(TRIGGER_HELPER, vec![instruction("griddepcontrol.launch_dependents;", true)]));
    }
}
