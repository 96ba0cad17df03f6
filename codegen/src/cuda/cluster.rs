//! Thread block clusters (compute capability 9.0): the slices of a sliced tile's product run as
//! the blocks of one cluster, which add their partial tiles through distributed shared memory
//! instead of scratch memory and a ticket (`tile_finish.rs`). Each block stages its partial tile in
//! its own shared memory; a cluster barrier (release, then acquire) makes every block's tile
//! visible to the others; each block then adds the slices of its share of the tile's rows, reading
//! each slice's tile from the shared memory of the block that computed it, in slice order, so the
//! sums are those of the ticket's last block, bit for bit; and a second barrier keeps every block's
//! shared memory alive until the others have read it. What it saves over the ticket is the round
//! trips through L2 (the partial tiles written and fenced, the ticket, the partial tiles read
//! back), and the finish is spread over the cluster's blocks rather than left to one. A kernel's
//! cluster size is fixed when it is compiled (`__cluster_dims__`), so a launch needs nothing more;
//! at most 8 blocks (the portable bound: kiln's estimate then cuts no more slices). The default on
//! cards of compute capability 9.0 (`requested`); `KILN_CUDA_CLUSTERS=0` (or
//! `with_cluster_setting`) turns it off, a tile table's line says it per product, and the
//! autotuner tries each product and the whole step both ways. In the emulator a cluster's blocks run
//! each on an OS thread of its own, one at a time, passing at its barriers (`emulator/cluster.h`).

use super::ast::*;

/// The prelude's helper for a cluster barrier: every thread of every block of the cluster arrives,
/// its shared-memory writes released, before any goes on (and acquires the others').
pub(crate) const SYNC_HELPER: &str = "kiln_cluster_sync";

/// The prelude's helper that reads a float at the same place in the shared memory of the
/// cluster's block `rank` as the pointer into the calling block's own.
pub(crate) const LOAD_HELPER: &str = "kiln_cluster_load";

/// Blocks a cluster may hold on every card that has clusters.
pub(super) const MAX_CLUSTER: usize = 8;

thread_local! {
    static ASKED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every sliced tile of the CUDA programs this thread specializes run as a cluster
/// where no choice says otherwise, as `KILN_CUDA_CLUSTERS=1` does.
pub fn with_clusters<R>(f: impl FnOnce() -> R) -> R {
    with_cluster_setting(true, f)
}

/// Runs `f` with sliced tiles as clusters (`on`) or through scratch memory and a ticket, where no
/// choice says otherwise, whatever the environment and the card.
pub fn with_cluster_setting<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&ASKED, Some(on), f)
}

/// Whether sliced tiles go to clusters where no choice says: as `with_cluster_setting` says, else
/// `KILN_CUDA_CLUSTERS` (`1` or `0`), else wherever the card has clusters (compute capability
/// 9.0). Measured on the H100 (2026-11-28, three interleaved runs of `cargo bench --bench steps`),
/// clusters took the autoencoder's step from 0.215 to 0.189 ms and kept the others' within noise.
pub(super) fn requested() -> bool {
    static ENV: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let env = super::choice_from_env(&ENV, "KILN_CUDA_CLUSTERS", &[("1", true), ("0", false)]);
    ASKED.with(|a| a.get()).or(env).unwrap_or_else(|| super::target_capability() >= 90)
}

/// The statement that waits at a cluster barrier.
pub(super) fn sync() -> Stmt {
    Stmt::Call(call(SYNC_HELPER, vec![]))
}

/// The float at `at` (a place in the calling block's shared memory) in block `rank`'s.
pub(super) fn load(at: Expr, rank: Expr) -> Expr {
    call(LOAD_HELPER, vec![at, rank])
}

/// The helpers, for the prelude of a module with clustered kernels.
pub(super) fn helpers() -> Vec<DeviceFn> {
    // Nothing may move across the barrier: it is what orders the blocks' shared memory.
    let sync = DeviceFn::instruction(
        SYNC_HELPER,
        "barrier.cluster.arrive.release.aligned;\\n\\tbarrier.cluster.wait.acquire.aligned;",
        true,
        call("kiln_emu_cluster_sync", vec![]),
    );
    let load = DeviceFn {
        ret: CType::Float,
        name: LOAD_HELPER,
        params: vec![(CType::ConstFloatPtr, "at"), (CType::UInt, "rank")],
        outputs: 0,
        body: vec![
            decl_mut(CType::Float, "value", Expr::F32(0.0)),
            Stmt::Asm {
                ptx: "{\\n\\t.reg .b32 remote;\\n\\tmapa.shared::cluster.u32 remote, %1, %2;\\n\\tld.shared::cluster.f32 %0, [remote];\\n\\t}",
                outputs: vec![("+f", var("value"))],
                inputs: vec![
                    ("r", cast(CType::UInt, call("__cvta_generic_to_shared", vec![var("at")]))),
                    ("r", var("rank")),
                ],
                // Ordered by the cluster barriers around it, which clobber memory.
                memory: false,
                emulated: call("kiln_emu_cluster_load", vec![var("value"), var("at"), var("rank")]),
            },
            Stmt::ReturnValue(var("value")),
        ],
    };
    vec![sync, load]
}
