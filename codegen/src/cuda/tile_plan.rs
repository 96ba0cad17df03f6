//! How a float product is cut into tiles and slices (`TilePlan`): kiln's own estimate of the tile
//! shape, the slices of the inner dimension, the slab buffers and whether a tile's slices run as a
//! thread block cluster, or what a tile choice (`with_tile_choice`, a tile table) fixes instead;
//! and the plan's sizes that the tiled kernel (`tiled.rs`) is emitted from. The estimate aims at
//! about one and a half blocks an SM of an H100 and was fitted to that card's product table; what
//! a card allows (asynchronous copies from compute capability 8.0, clusters from 9.0) comes from
//! the target the code is generated for (`with_target_arch`).

use super::ast::*;
use super::emit::THREADS;
use super::mma;
use super::tile_shape::{choice, TileShape};
use super::tile_staging::MAX_STAGES;
use crate::kernel::MatMul;

/// Tiles times slices aimed for: about one and a half blocks for each of an H100's 132 SMs.
/// Measured there (`cargo bench --bench products`, the workloads' 31 tiled products; figures in
/// `benches/results/h100-2026-11-27`), `TilePlan::for_product`'s choice came within 4% of the
/// best tiling of each product (geometric mean), where the rule before it (264 blocks, 64x64
/// tiles from 16 of them up, slices two slabs deep) was 23% off.
const TARGET_BLOCKS: usize = 200;

/// `TARGET_BLOCKS`, or what `KILN_CUDA_TARGET_BLOCKS` sets (to measure another on a card: in a
/// step, a product shares the SMs with the kernels beside it).
fn target_blocks() -> usize {
    static BLOCKS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::bound_from_env(&BLOCKS, "KILN_CUDA_TARGET_BLOCKS", TARGET_BLOCKS).max(1)
}

/// A slice of a 32x32 tile is at least one slab (32) deep, of a larger tile 64: thinner slices
/// of the larger tiles spent more on their partial tiles than they gained (on the H100, a
/// 784x128x256 weight gradient took 18.4 us in 64x64 tiles of four 32-deep slices and 11.9 in
/// whole 32x32 tiles).
fn shallowest_slice(shape: TileShape) -> usize {
    if shape.dims().0 == 32 {
        32
    } else {
        64
    }
}

/// At most this many slices: the last block of a tile reads every slice's partial tile.
const MAX_SLICES: usize = 12;

/// The tile shapes kiln picks from, largest first (128x128 tiles lost to 128x64 on every
/// product measured), the smallest as `smallest_shape` says.
const SHAPES_BY_SIZE: [TileShape; 2] = [TileShape::T128x64, TileShape::T64x64];

/// The 32x32 tiles kiln picks: in four groups of threads along each slab (`T32x32K4`), unless
/// `KILN_CUDA_K_GROUPS=0` (then `T32x32`, 2x2 outputs a thread, to measure what the groups
/// save: on the H100 the 2x2 form read shared memory as often as it multiplied, so its 32x32
/// products ran at a quarter of the FMA rate at best).
fn smallest_shape() -> TileShape {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if super::switch_from_env(&OFF, "KILN_CUDA_K_GROUPS", "0") {
        TileShape::T32x32
    } else {
        TileShape::T32x32K4
    }
}

/// Shared memory a tile by float32 FMAs may take: what a block may declare statically (the
/// budget its defaults were measured with).
const SHARED_BYTES: usize = super::dynamic_shared::STATIC_BYTES;

/// Shared memory a tile on tensor cores may take: `KILN_CUDA_TC_SHARED_KIB`, else as much as
/// lets two blocks share an SM of the target card (113 KiB on an H100, 81 on an A100, at least
/// the 48 KiB any block may declare). Their slabs are held as copied and split besides, so at 48
/// KiB a 64x64 tile's slices could not run as a cluster, nor a 128x128 tile split a turn ahead.
fn tensor_core_shared_bytes() -> usize {
    static KIB: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let card = super::dynamic_shared::target_two_blocks_an_sm();
    let asked = TENSOR_CORE_SHARED
        .with(|s| s.get())
        .unwrap_or_else(|| 1024 * super::bound_from_env(&KIB, "KILN_CUDA_TC_SHARED_KIB", 0));
    match asked {
        0 => card.max(SHARED_BYTES),
        bytes => bytes.min(super::dynamic_shared::target_block_bytes()),
    }
}

thread_local! {
    static TENSOR_CORE_SHARED: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every CUDA program this thread specializes giving tiles on tensor cores `bytes`
/// of shared memory (at most what a block may have on the target card), whatever
/// `KILN_CUDA_TC_SHARED_KIB` says.
pub fn with_tensor_core_shared<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&TENSOR_CORE_SHARED, Some(bytes), f)
}

/// Threads per block along each side of the tile.
const SIDE: usize = 16;

/// Slab buffers where no choice says: `KILN_CUDA_STAGES`, else `DEFAULT_STAGES` where the card has
/// asynchronous copies (compute capability 8.0), else 1.
fn stages_from_env() -> usize {
    static STAGES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match super::bound_from_env(&STAGES, "KILN_CUDA_STAGES", 0) {
        0 if super::target_capability() >= 80 => DEFAULT_STAGES,
        0 => 1,
        stages => stages,
    }
}

/// Slab buffers filled by asynchronous copies where a card has them. Measured on the H100
/// (2026-11-28, three interleaved runs of `cargo bench --bench steps` with sliced tiles as
/// clusters): three buffers were never slower than one (the autoencoder's step 0.187 ms against
/// 0.189, fmnist-mlp's 0.050 against 0.054, the rest within noise), and eight no faster than
/// three; `benches/results/h100-2026-11-28`.
pub(super) const DEFAULT_STAGES: usize = 3;

/// Whether tiles go to tensor cores where no choice says (`KILN_CUDA_TF32X3=1`; needs compute
/// capability 8.0 or newer). Off until timed on a card: on the H100 of 2026-11-27 the tensor-core
/// tiles of then lost to float32 FMAs in every product but a few, by little.
pub(super) static TENSOR_CORES: super::Switch = super::Switch::new("KILN_CUDA_TF32X3", false);

/// Runs `f` with every CUDA program this thread specializes computing its tiles on tensor cores
/// (`on`: 3xTF32) or by float32 FMAs where no tile choice says, whatever `KILN_CUDA_TF32X3` says.
pub fn with_tensor_cores<R>(on: bool, f: impl FnOnce() -> R) -> R {
    TENSOR_CORES.with(on, f)
}

/// How a product is cut into tiles and slices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct TilePlan {
    pub(super) bm: usize,
    pub(super) bn: usize,
    pub(super) bk: usize,
    pub(super) tiles_m: usize,
    pub(super) tiles_n: usize,
    /// Slices of the inner dimension (1: no partial tiles).
    pub(super) slices: usize,
    /// Slabs of `bk` per slice.
    pub(super) slabs: usize,
    /// Computed by tensor-core multiply-adds (3xTF32) rather than float32 FMAs.
    pub(super) tensor_cores: bool,
    /// The tile shape, as computed (`TileShape::computed_as`).
    pub(super) shape: TileShape,
    /// Slab buffers, filled by asynchronous copies `stages - 1` slabs ahead (1: one buffer, the
    /// next slab loaded into registers).
    pub(super) stages: usize,
    /// The slices of a tile run as one thread block cluster (`cluster.rs`): block `tile * slices
    /// + slice` rather than `slice * tiles + tile`.
    pub(super) cluster: bool,
    /// Tensor cores with copied slabs (`split_slabs`) split each slab a turn before they multiply
    /// it, into the other of two split buffers (`Emitter::slabs_by_copies`): one barrier a turn
    /// rather than two, and a warp's split of the next slab beside its multiply-adds of this one.
    pub(super) split_ahead: bool,
    /// Bytes of shared memory the tile may take (`SHARED_BYTES`, `tensor_core_shared_bytes`);
    /// past 48 KiB the kernel declares it dynamically (`dynamic_shared.rs`).
    pub(super) shared_budget: usize,
}

/// Whether unsliced tiles copied asynchronously take slabs twice their shape's depth where the
/// inner dimension allows (`TilePlan::for_product`): `KILN_CUDA_DEEP_SLABS=0` keeps the shape's.
pub(super) static DEEP_SLABS: super::Switch = super::Switch::new("KILN_CUDA_DEEP_SLABS", true);

/// Runs `f` with every CUDA program this thread specializes taking deep slabs where they can
/// (`on`), or each tile shape's own depth, whatever `KILN_CUDA_DEEP_SLABS` says.
pub fn with_deep_slabs<R>(on: bool, f: impl FnOnce() -> R) -> R {
    DEEP_SLABS.with(on, f)
}

/// Whether tensor-core tiles with copied slabs split each slab a turn ahead where the second split
/// buffer fits (`TilePlan::split_ahead`): `KILN_CUDA_SPLIT_AHEAD=0` splits the slab of the turn,
/// to time the two.
pub(super) static SPLIT_AHEAD: super::Switch = super::Switch::new("KILN_CUDA_SPLIT_AHEAD", true);

/// Runs `f` with every CUDA program this thread specializes splitting tensor-core slabs a turn
/// ahead where they can (`on`), or in their turn, whatever `KILN_CUDA_SPLIT_AHEAD` says.
pub fn with_split_ahead<R>(on: bool, f: impl FnOnce() -> R) -> R {
    SPLIT_AHEAD.with(on, f)
}

/// Whether kiln's estimate cuts the slice count nearest to the one it wants (`slabs_per_slice`),
/// rather than the most it can without passing it: `KILN_CUDA_NEAREST_SLICES=1`, to time the two.
pub(super) static NEAREST_SLICES: super::Switch = super::Switch::new("KILN_CUDA_NEAREST_SLICES", false);

/// Runs `f` with every CUDA program this thread specializes cutting the slice count nearest to the
/// one wanted (`on`), or the most up to it, whatever `KILN_CUDA_NEAREST_SLICES` says.
pub fn with_nearest_slices<R>(on: bool, f: impl FnOnce() -> R) -> R {
    NEAREST_SLICES.with(on, f)
}

/// Slabs in each slice when `total` slabs are cut into about `wanted` slices (at most `most`).
/// Slices are whole slabs, so only some counts can be cut: `total / s` rounded up for `s` slabs a
/// slice. By default the fewest slabs a slice that give no more slices than wanted, which can be
/// about half of them: 8 slabs wanted in 7 slices are 4 slices of 2, where 8 of 1 were nearer (the
/// autoencoder's and fmnist-mlp's 128x250x30 and 128x256x256 products). `NEAREST_SLICES` takes
/// the nearer of the two counts around the one wanted (the fewer on a tie).
fn slabs_per_slice(total: usize, wanted: usize, most: usize) -> usize {
    let fewest_slabs = total.div_ceil(wanted);
    let below = total.div_ceil(fewest_slabs);
    if !NEAREST_SLICES.on() || fewest_slabs == 1 {
        return fewest_slabs;
    }
    let above = total.div_ceil(fewest_slabs - 1);
    if above <= most && above - wanted < wanted - below {
        fewest_slabs - 1
    } else {
        fewest_slabs
    }
}

impl TilePlan {
    pub(super) fn for_product(mm: &MatMul) -> TilePlan {
        let tiles_in = |shape: TileShape| {
            let (bm, bn, _) = shape.dims();
            mm.m.div_ceil(bm) * mm.n.div_ceil(bn)
        };
        let deepest_cut = |shape: TileShape| (mm.k / shallowest_slice(shape)).clamp(1, MAX_SLICES);
        let choice = choice(mm);
        let target = target_blocks();
        // Larger tiles do more arithmetic per byte staged, so the largest shape that still
        // gives the SMs enough blocks, counting the slices its inner dimension allows, and that
        // the output fills at least half of (a 4096x256x10 product took 15.1 us in 64x64 tiles
        // of four slices and 10.9 in whole 32x32 ones).
        let shape = choice.tile.unwrap_or_else(|| {
            let filled = |s: TileShape| {
                let (bm, bn, _) = s.dims();
                bm < 2 * mm.m && bn < 2 * mm.n
            };
            let enough = |s: &TileShape| filled(*s) && tiles_in(*s) * deepest_cut(*s) >= target;
            SHAPES_BY_SIZE.into_iter().find(enough).unwrap_or_else(smallest_shape)
        });
        let tensor_cores = choice.tensor_cores.unwrap_or_else(|| TENSOR_CORES.on());
        let stages = choice.stages.unwrap_or_else(stages_from_env);
        let (bm, bn, bk) = shape.dims();
        let (tiles_m, tiles_n) = (mm.m.div_ceil(bm), mm.n.div_ceil(bn));
        let tiles = tiles_m * tiles_n;
        // Tiles enough for most of the target need no slices (they would only add partial tiles).
        let tiles_enough = 2 * tiles >= target;
        let wanted = if tiles_enough { 1 } else { target.div_ceil(tiles).min(deepest_cut(shape)) };
        // Clusters asked for: kiln's estimate cuts no more slices than a cluster holds.
        let clustered = choice.cluster.unwrap_or_else(super::cluster::requested);
        let wanted = if clustered { wanted.min(super::cluster::MAX_CLUSTER) } else { wanted };
        let with_depth = |bk: usize| {
            let slabs_total = mm.k.div_ceil(bk).max(1);
            let slabs = match choice.slices {
                Some(asked) => slabs_total.div_ceil(asked.min(slabs_total).max(1)),
                None => {
                    let most = if clustered { super::cluster::MAX_CLUSTER } else { MAX_SLICES };
                    slabs_per_slice(slabs_total, wanted.max(1), most)
                }
            };
            let mut plan = TilePlan {
                bm,
                bn,
                bk,
                tiles_m,
                tiles_n,
                slices: slabs_total.div_ceil(slabs),
                slabs,
                tensor_cores,
                shape: shape.computed_as(tensor_cores),
                // A slice's slabs all in flight at once take `slabs + 1` buffers; more would stay
                // empty.
                stages: stages.clamp(1, MAX_STAGES).min(slabs + 1),
                cluster: false,
                split_ahead: false,
                shared_budget: if tensor_cores { tensor_core_shared_bytes() } else { SHARED_BYTES },
            };
            // As many buffers as fit in shared memory beside a band of the staged tile.
            while plan.stages > 1 && !plan.fits_in_shared_memory() {
                plan.stages -= 1;
            }
            // A cluster's blocks read each other's whole staged tile, so it must fit beside the
            // slabs.
            plan.cluster = clustered && (2..=super::cluster::MAX_CLUSTER).contains(&plan.slices) && plan.bands() == 1;
            // The second split buffer where it fits beside the buffers that fit without it (an
            // unsliced tile may then stage its epilogue in more bands, within its slab buffers),
            // and leaves a cluster's staged tile whole.
            plan.split_ahead = plan.split_slabs() && plan.stages < MAX_STAGES && SPLIT_AHEAD.on();
            if plan.split_ahead && !(plan.fits_in_shared_memory() && (!plan.cluster || plan.bands() == 1)) {
                plan.split_ahead = false;
            }
            plan
        };
        // Slabs copied asynchronously take no registers to stage, so an unsliced tile's are twice
        // as deep where its inner dimension takes an even number of the shape's slabs (no slab
        // more of zeros): half the turns, each with its wait, barrier and copies, and as many
        // steps in flight in one buffer fewer. A turn of the autoencoder's weight gradients then
        // spends 1.18 to 1.20 instructions a multiply-add in 128x64 and 64x64 tiles (1.25 to
        // 1.27 before), 1.40 to 1.43 in 32x32 tiles in thread groups (1.50 to 1.58);
        // `cuda_source --loads`. Sliced tiles keep theirs: a slice is a few slabs deep.
        // `KILN_CUDA_DEEP_SLABS=0` keeps every tile's own depth, to time the two. On tensor cores
        // (whose slabs are also kept split, twice over where split ahead: `slab_words`) only
        // where the deeper slabs keep every buffer and the split ahead of the shape's own: with
        // an H100's 113 KiB a tile, a 128x64 tile's 16-deep turn is 48 multiply-adds in 225 to
        // 235 instructions (two 8-deep turns: 268 to 282; `cuda_source --loads`).
        let unsliced = choice.slices.map_or(tiles_enough, |s| s == 1);
        if !(stages > 1 && unsliced && mm.k.div_ceil(bk).is_multiple_of(2) && DEEP_SLABS.on()) {
            return with_depth(bk);
        }
        let deep = with_depth(2 * bk);
        if !tensor_cores {
            return deep;
        }
        let own = with_depth(bk);
        if deep.stages == own.stages && deep.split_ahead == own.split_ahead {
            deep
        } else {
            own
        }
    }

    /// The comment heading the kernel `kernel` that computes `mm` so.
    pub(super) fn describe(&self, kernel: &str, mm: &MatMul) -> String {
        let sliced = if self.slices > 1 { format!(", its inner dim in {} slices", self.slices) } else { String::new() };
        let on = if self.tensor_cores { " on tensor cores (3xTF32)" } else { "" };
        let copied = match self.stages - 1 {
            0 => String::new(),
            1 => ", 1 slab in flight (cp.async)".to_string(),
            ahead => format!(", {ahead} slabs in flight (cp.async)"),
        };
        let clustered = if self.cluster { ", the slices of a tile a cluster" } else { "" };
        format!(
            "{kernel} computes the product of {} ({}x{}x{}) in {} tiles{on}{sliced}{clustered}{copied} (no cuBLAS call), then its epilogue",
            mm.name,
            mm.m,
            mm.k,
            mm.n,
            self.shape.label()
        )
    }

    /// Blocks an SM the kernel's registers are budgeted for (`Kernel::min_blocks`). With the
    /// threads alone as its bound, ptxas may hold a tensor-core tile to 64 registers so that more
    /// blocks fit, and spill; one block an SM is all such a tile asks for. A tile whose slabs are
    /// copied asynchronously holds their addresses too (ptxas gave 32x32k4 and 64x64 tiles 85 to
    /// 89 registers a thread, two blocks an SM): three blocks (80 registers) where a thread has at
    /// most 16 outputs (none spilled: `cuda_codegen`'s register test), so that the workloads'
    /// grids of up to ~400 blocks fit the H100's SMs at once; two (128) for larger tiles, which
    /// spilled at three. Larger tiles whose next slab goes through registers are held to two
    /// blocks as well (a 128x128 tile took 130 registers of its own, one block an SM).
    pub(super) fn blocks_per_sm(&self) -> Option<u32> {
        let (rows, cols) = self.per_thread();
        if self.tensor_cores {
            Some(1)
        } else if self.stages > 1 {
            Some(if rows * cols <= 16 { 3 } else { 2 })
        } else if rows * cols > 16 {
            Some(2)
        } else {
            None
        }
    }

    /// Whether the slabs are twice as deep as the shape's own (`for_product`).
    pub(super) fn deepened(&self) -> bool {
        self.bk > self.shape.dims().2
    }

    /// Multiply-adds each thread does over its slice of the inner dimension: its outputs times
    /// the depth its group covers.
    pub(super) fn macs_per_thread(&self) -> usize {
        let (rows, cols) = self.per_thread();
        rows * cols * self.bk / self.groups() * self.slabs
    }

    pub(super) fn blocks(&self) -> usize {
        self.tiles_m * self.tiles_n * self.slices
    }

    /// Outputs per thread along rows and columns.
    pub(super) fn per_thread(&self) -> (usize, usize) {
        if self.tensor_cores {
            mma::per_thread(self.bm, self.bn)
        } else {
            (self.bm / self.side(), self.bn / self.side())
        }
    }

    /// Threads of a group along each side of the tile (by float32 FMAs): 16 (a group of 256),
    /// or 8 in each of four groups.
    pub(super) fn side(&self) -> usize {
        if self.groups() == 4 {
            SIDE / 2
        } else {
            SIDE
        }
    }

    /// Threads in each group.
    pub(super) fn group_threads(&self) -> usize {
        THREADS as usize / self.groups()
    }

    /// Groups of threads splitting each slab's depth, each computing the whole tile (1: none).
    pub(super) fn groups(&self) -> usize {
        self.shape.groups()
    }

    /// Whether a thread's outputs are adjacent (4x4 or more, read as `float4`s) rather than 16
    /// apart.
    pub(super) fn vectors(&self) -> bool {
        !self.tensor_cores && self.per_thread().0 >= 4
    }

    /// Row pitch of the staged slabs, padded against bank conflicts: a multiple of four floats
    /// where they are read as `float4`s; for tensor cores, 4 past a multiple of 16 pairs of words,
    /// so each half-warp's 16 pairs of a fragment (rows `quad` by columns `group`) fall in 32
    /// different banks.
    /// Slabs copied as they are for tensor cores (`split_slabs`) are read a fragment at a time by
    /// the split (`mma::split_slab`): steps `quad` by rows `group`, which fall in 32 different
    /// banks 8 past a multiple of 32.
    pub(super) fn pitch(&self, side: usize) -> usize {
        side + if self.split_slabs() {
            8
        } else if self.tensor_cores || self.vectors() {
            4
        } else {
            1
        }
    }

    /// Words of shared memory that both operands' slab buffers take. On tensor cores a slab is
    /// multiplied from its high and low parts (two words an element): through registers the one
    /// buffer holds them, with copies the buffers hold the words as copied and the slab being
    /// multiplied is split into arrays of its own (`split_slabs`, `mma::split_arrays`).
    pub(super) fn slab_words(&self) -> usize {
        let buffer = self.bk * (self.pitch(self.bm) + self.pitch(self.bn));
        match (self.tensor_cores, self.split_slabs()) {
            (false, _) => buffer * self.stages,
            (true, false) => buffer * 2,
            (true, true) => buffer * self.stages + self.split_buffers() * 2 * self.bk * (self.bm + self.bn),
        }
    }

    /// Split buffers (`mma::split_arrays`): two where the block splits a turn ahead.
    pub(super) fn split_buffers(&self) -> usize {
        if self.split_ahead {
            2
        } else {
            1
        }
    }

    /// Whether the slabs are copied as they are into the slab buffers and each is split into its
    /// high and low parts by the block once it has landed, into arrays of their own in the order
    /// the warps read them (`mma::split_slab`): tensor cores with slabs copied asynchronously.
    pub(super) fn split_slabs(&self) -> bool {
        self.tensor_cores && self.stages > 1
    }

    /// Whether the slab buffers and the smallest band of the staged tile (the whole tile where
    /// groups add their copies) fit in a block's shared memory, with room for its flags.
    fn fits_in_shared_memory(&self) -> bool {
        let rows = if self.groups() > 1 { self.bm } else { 1 };
        (self.slab_words() + self.staged_words_of_their_own(rows)) * 4 + 16 <= self.shared_budget
    }

    /// Whether `rows` rows of the staged tile fit in `a`'s slab buffers, and are staged there:
    /// the slabs are dead once the slice's last one is multiplied (and every thread's copies have
    /// landed and the block has passed a barrier: `Emitter::tiled_elementwise`), so the shared
    /// memory the tile would take of its own goes to more slabs in flight (32x32 tiles in thread
    /// groups: five buffers, a 128-deep slice's four slabs all in flight, where three buffers and
    /// the groups' copies of the tile filled 48 KiB). Not on tensor cores through registers, whose
    /// one buffer holds words split in two.
    pub(super) fn staged_in_slabs(&self, rows: usize) -> bool {
        (!self.tensor_cores || self.split_slabs())
            && self.staged_words(rows) <= self.stages * self.bk * self.pitch(self.bm)
    }

    /// Words of shared memory that `rows` rows of the staged tile take beside the slabs.
    fn staged_words_of_their_own(&self, rows: usize) -> usize {
        if self.staged_in_slabs(rows) {
            0
        } else {
            self.staged_words(rows)
        }
    }

    /// The most rows of the tile that each block of a cluster of its slices finishes (its share,
    /// the last share shorter; `tile_finish.rs`).
    pub(super) fn cluster_share(&self) -> usize {
        self.bm.div_ceil(self.slices)
    }

    /// The rows of the tile that its finish stages at a time (`tile_finish.rs`): a band of an
    /// unsliced tile, the whole of a sliced one where groups add their copies or the slices are
    /// a cluster; `None` where a slice writes its partial tile straight from its registers.
    pub(super) fn staged_rows(&self) -> Option<usize> {
        if self.slices == 1 {
            Some(self.bm / self.bands())
        } else if self.cluster || self.groups() > 1 {
            Some(self.bm)
        } else {
            None
        }
    }

    /// Words of shared memory that `rows` rows of the staged tile take (a copy per group).
    pub(super) fn staged_words(&self, rows: usize) -> usize {
        rows * super::tile_finish::staged_pitch(self) as usize * self.groups()
    }

    /// The row of the tile that a thread's `i`-th output lies in.
    pub(super) fn out_row(&self, i: usize) -> Expr {
        if self.tensor_cores {
            mma::output_row((self.bm, self.bn), i)
        } else {
            lane_offset(self, "ty", i)
        }
    }

    /// The column of the tile that a thread's `j`-th output lies in.
    pub(super) fn out_col(&self, j: usize) -> Expr {
        if self.tensor_cores {
            mma::output_col((self.bm, self.bn), j)
        } else {
            lane_offset(self, "tx", j)
        }
    }

    /// Bands of rows in which an unsliced tile is staged for its epilogue: the fewest that keep
    /// the block's static shared memory (both slabs and a band) within 48 KiB.
    pub(super) fn bands(&self) -> usize {
        let slabs = self.slab_words();
        let fits = |bands: usize| (slabs + self.staged_words_of_their_own(self.bm / bands)) * 4 <= self.shared_budget;
        (0..).map(|p| 1 << p).find(|&b| fits(b) || b >= self.bm).expect("a band of one row fits")
    }

    /// Words of one operand's slab that each thread stages.
    pub(super) fn loads_per_thread(&self, a: bool) -> usize {
        (if a { self.bm } else { self.bn }) * self.bk / THREADS as usize
    }
}

/// The row (`a`) or column of the tile that a thread's `i`-th output lies in.
pub(super) fn lane_offset(plan: &TilePlan, along: &str, i: usize) -> Expr {
    if plan.vectors() {
        // Runs of four adjacent outputs (a float4), a thread's runs `side` float4s apart.
        var(along) * int(4) + int((i % 4 + i / 4 * 4 * plan.side()) as i64)
    } else {
        var(along) + int((plan.side() * i) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::tile_shape::{with_tile_choice, TileChoice};
    use crate::cuda::with_target_arch;

    fn product(m: usize, k: usize, n: usize) -> MatMul {
        MatMul {
            name: "k0_matmul".into(),
            origin: vec![],
            dtype: kiln_ir::DType::F32,
            a: 0,
            b: 1,
            c: 2,
            a_transposed: false,
            b_transposed: false,
            batch: 1,
            a_batch_stride: 0,
            b_batch_stride: 0,
            m,
            k,
            n,
            epilogue: None,
        }
    }

    fn plan(m: usize, k: usize, n: usize) -> (String, usize) {
        let mm = product(m, k, n);
        let p = TilePlan::for_product(&mm);
        (p.shape.label(), p.slices)
    }

    #[test]
    fn the_largest_tile_that_still_fills_the_card_with_slices_only_where_the_inner_dim_is_deep() {
        // Products of the workloads, each tiled as the H100 timed it fastest or within 10%.
        // Weight gradients (k = the batch, 128): whole tiles, larger as the output grows.
        assert_eq!(plan(784, 128, 256), ("32x32k4".into(), 1));
        assert_eq!(plan(1000, 128, 500), ("64x64".into(), 1));
        assert_eq!(plan(784, 128, 1000), ("128x64".into(), 1));
        // Forward products of a batch of 128: few tiles, so the inner dim in slices.
        assert_eq!(plan(128, 784, 256), ("32x32k4".into(), 7));
        assert_eq!(plan(128, 256, 256), ("32x32k4".into(), 4));
        assert_eq!(plan(128, 1000, 784), ("64x64".into(), 8));
        // An inner dim too shallow to slice.
        assert_eq!(plan(128, 30, 250), ("32x32k4".into(), 1));
        // A batch of 4096: tiles enough without slices.
        assert_eq!(plan(4096, 256, 10), ("32x32k4".into(), 1));
    }

    #[test]
    fn nearest_slices_cut_the_count_nearest_to_the_one_wanted_where_asked() {
        // 128x250x30 (32x32k4 tiles: 4 tiles, 7 slices wanted, 8 slabs): 4 slices of 2 slabs, or
        // with the nearest count 8 of 1. 128x784x256 wants 7 of 25 slabs and gets them either way.
        assert_eq!(plan(128, 250, 30), ("32x32k4".into(), 4));
        assert_eq!(with_nearest_slices(true, || plan(128, 250, 30)), ("32x32k4".into(), 8));
        assert_eq!(with_nearest_slices(true, || plan(128, 784, 256)), ("32x32k4".into(), 7));
        // Around 5 of 12 slabs: 4 slices of 3 or 6 of 2, the same distance: the fewer.
        assert_eq!(with_nearest_slices(true, || slabs_per_slice(12, 5, 12)), 3);
        // Never past the most the inner dimension allows, nor where every slab is a slice.
        assert_eq!(with_nearest_slices(true, || slabs_per_slice(8, 7, 7)), 2);
        assert_eq!(with_nearest_slices(true, || slabs_per_slice(3, 7, 12)), 1);
    }

    #[test]
    fn asynchronous_slab_buffers_are_as_many_as_asked_where_they_fit_in_shared_memory() {
        let stages = |tile, stages, tensor_cores| {
            let choice = TileChoice { stages: Some(stages), ..TileChoice::forced(tile, 1, tensor_cores) };
            with_tile_choice(choice, || TilePlan::for_product(&product(128, 784, 256)))
        };
        assert_eq!(stages(TileShape::T64x64, 3, false).stages, 3);
        // Three 32x32k4 buffers (9 KiB each) and the groups' four copies of the tile (18 KiB) beside
        // them fill 48 KiB; from four buffers on `a`'s hold the copies, and five fit.
        let plan = stages(TileShape::T32x32K4, 3, false);
        assert_eq!((plan.stages, plan.staged_in_slabs(plan.bm)), (3, false));
        let plan = stages(TileShape::T32x32K4, MAX_STAGES, false);
        assert_eq!((plan.stages, plan.staged_in_slabs(plan.bm)), (5, true));
        assert!(plan.fits_in_shared_memory());
        // Tensor cores copy their operands as they are, and split the slab they multiply into
        // arrays of its own: three 64x64 buffers of 16-deep slabs (27 KiB) and the split slab (two
        // words an element, 16 KiB) leave no room for the whole tile beside them (17 KiB), nor
        // in `a`'s buffers (13.5 KiB): it is staged in `a`'s buffers in two bands.
        let tc = with_tensor_core_shared(SHARED_BYTES, || stages(TileShape::T64x64, 3, true));
        assert_eq!((tc.stages, tc.bk, tc.split_slabs(), tc.bands(), tc.split_ahead), (3, 16, true, 2, false));
        assert!(tc.fits_in_shared_memory() && tc.staged_in_slabs(tc.bm / 2) && !tc.staged_in_slabs(tc.bm));
        // With the 113 KiB that let two blocks share an H100's SM, the tile is staged whole, and
        // the slab is split a turn ahead into a second split buffer (27 + 32 + 17 KiB).
        let tc = with_target_arch("sm_90", || stages(TileShape::T64x64, 3, true));
        assert_eq!((tc.stages, tc.bands(), tc.split_ahead, tc.shared_budget), (3, 1, true, 113 * 1024));
        assert!(tc.fits_in_shared_memory());
        assert!(!stages(TileShape::T64x64, 1, true).split_slabs());
        assert_eq!(stages(TileShape::T64x64, 1, false).stages, 1);
        // As deep as fits: unsliced 128x64 slabs copied asynchronously are 16 deep (784 is 98
        // slabs of 8, an even number; 12.5 KiB a buffer), so three buffers; 64x64 ones stay 16
        // deep (784 is 49 slabs of 16: a 32-deep 25th would be half zeros; 8.5 KiB) and take
        // five. Through registers, 128x64 slabs stay 8 deep.
        let deep = stages(TileShape::T128x64, MAX_STAGES, false);
        assert_eq!((deep.stages, deep.bk, deep.fits_in_shared_memory()), (3, 16, true));
        assert_eq!(stages(TileShape::T128x64, 1, false).bk, 8);
        let odd = stages(TileShape::T64x64, MAX_STAGES, false);
        assert_eq!((odd.stages, odd.bk), (5, 16));
        // No more buffers than the slice has slabs, plus the one being multiplied: a 128-deep
        // inner dim in two slices of two 32-deep slabs (sliced tiles keep their depth) takes three.
        let shallow = TileChoice { stages: Some(MAX_STAGES), ..TileChoice::forced(TileShape::T32x32, 2, false) };
        let plan = with_tile_choice(shallow, || TilePlan::for_product(&product(128, 128, 256)));
        assert_eq!((plan.bk, plan.slabs, plan.stages), (32, 2, 3));
        // Unsliced, the same product's slabs are 64 deep (two).
        let whole = TileChoice { stages: Some(MAX_STAGES), ..TileChoice::forced(TileShape::T32x32, 1, false) };
        let plan = with_tile_choice(whole, || TilePlan::for_product(&product(128, 128, 256)));
        assert_eq!((plan.bk, plan.slabs), (64, 2));
    }

    #[test]
    fn tensor_core_slabs_are_split_a_turn_ahead_where_the_second_split_buffer_fits() {
        let plan = |tile, slices, stages| {
            let choice = TileChoice { stages: Some(stages), ..TileChoice::forced(tile, slices, true) };
            let plan = || with_tile_choice(choice, || TilePlan::for_product(&product(4096, 784, 256)));
            with_tensor_core_shared(SHARED_BYTES, plan)
        };
        // Within 48 KiB of shared memory. 128x64: three buffers of 8-deep slabs (20 KiB) and two split buffers (24 KiB); the
        // unsliced tile's epilogue then goes in four bands of 32 rows inside `a`'s buffers.
        let whole = plan(TileShape::T128x64, 1, 3);
        assert_eq!((whole.split_ahead, whole.stages, whole.bands()), (true, 3, 4));
        assert!(whole.fits_in_shared_memory() && whole.staged_in_slabs(whole.bm / whole.bands()));
        let sliced = plan(TileShape::T128x64, 4, 3);
        assert!(sliced.split_ahead && sliced.fits_in_shared_memory());
        // Not where it would not fit beside the buffers that fit without it, nor through
        // registers, nor where switched off.
        assert!(!plan(TileShape::T128x128, 1, 3).split_ahead);
        assert!(!plan(TileShape::T64x64, 1, 3).split_ahead);
        assert!(!plan(TileShape::T128x64, 1, 1).split_ahead);
        let off = with_split_ahead(false, || plan(TileShape::T128x64, 1, 3));
        assert_eq!((off.split_ahead, off.bands()), (false, 2));
        // With an H100's 113 KiB a tile (`tensor_core_shared_bytes`), every shape splits ahead,
        // and 128-row tiles take slabs twice their shape's depth (784 is 98 slabs of 8, an even
        // number; 49 of 16, odd, for 64x64 tiles) where three buffers and two split buffers of
        // them fit: a 128x64 tile's (87 KiB; its epilogue staged in two bands, within its slab
        // buffers), not a 128x128 one's (116 KiB: it keeps 8-deep slabs and stages its epilogue
        // in two bands beside them); a 64x64 tile stages its epilogue whole.
        let h100 = |tile| {
            let choice = TileChoice { stages: Some(3), ..TileChoice::forced(tile, 1, true) };
            with_target_arch("sm_90", || with_tile_choice(choice, || TilePlan::for_product(&product(4096, 784, 256))))
        };
        for (tile, bk, bands) in [(TileShape::T128x64, 16, 2), (TileShape::T64x64, 16, 1), (TileShape::T128x128, 8, 2)]
        {
            let p = h100(tile);
            assert_eq!((p.split_ahead, p.stages, p.bk, p.bands()), (true, 3, bk, bands), "{tile:?}");
            assert!(p.fits_in_shared_memory(), "{tile:?}");
        }
        // Not deeper where that would cost a buffer or the split ahead: within 48 KiB, 128x64
        // slabs stay 8 deep.
        assert_eq!(plan(TileShape::T128x64, 1, 3).bk, 8);
        let deep = with_deep_slabs(false, || h100(TileShape::T128x64));
        assert_eq!((deep.bk, deep.bands()), (8, 1));
    }
}
