//! Float products of medium size computed by kiln's own tiled kernel, with their epilogue in the
//! same kernel: one launch instead of a cuBLAS call and an epilogue kernel. At the batch sizes of a
//! training step (a 128x784x256 layer) a product is a few microseconds of arithmetic, and what a
//! step pays is per launch; cuBLAS stays for the large products, where its kernels' speed matters.
//!
//! Each block computes a tile of the result from slabs of both operands staged in shared memory
//! (the next slab loaded into registers while the current one is used, or, opt-in, up to seven
//! slabs copied asynchronously into buffers of their own, the tile's outputs then staged in those
//! buffers where they fit there; `tile_staging.rs`), each
//! of its 256 threads a few outputs in registers: 128x64 or 64x64 tiles with 8x4 or 4x4 outputs a
//! thread, read from shared memory as `float4`s (four multiply-adds per word read; eight rows as
//! two runs of four, half the tile apart, so that a quarter warp's reads hit 32 banks); 32x32 tiles
//! with four groups of 64 threads, each group computing the whole tile (4x4 outputs a thread, as
//! `float4`s) over a quarter of each slab's depth, the groups' partial tiles added in group order
//! (`T32x32K4`; `T32x32`, 2x2 outputs a thread 16 apart, read a word for every multiply-add).
//! The shape is the largest that the output fills and that gives the card enough blocks
//! (`TilePlan::for_product`; 128x128 tiles only when asked, to measure them). When tiles are too
//! few to fill the card, the inner dimension is cut into slices, a block per (tile, slice): each
//! block writes its partial tile to scratch memory, and the last block of a tile to finish (a
//! ticket counter) adds the slices in slice order, so the result does not depend on timing
//! (`tile_finish.rs`). The block that holds a tile's final values then runs the epilogue
//! group on it, an element per thread in row-major order (coalesced), with the product's value
//! where the epilogue would have read it from memory. With tensor cores asked for
//! (`KILN_CUDA_TF32X3=1`, or `TileChoice::tensor_cores`), the same tiles are computed by warp
//! multiply-adds at float32 accuracy (3xTF32, `mma.rs`); opt-in until measured on a card. Where
//! a tile table (`tile_table.rs`) lists a product, its measured choice replaces these estimates.

use super::ast::*;
use super::emit::{Emitter, ProductInEpilogue, MAX_GRID, THREADS};
use super::mma;
use super::tile_staging::{self, MAX_STAGES};
use crate::kernel::{LoopKernel, MatMul};
use kiln_ir::DType;

/// Products of at most this many multiply-adds are tiled (when they have an epilogue to take in);
/// larger ones go to cuBLAS, whose kernels are faster once the arithmetic dominates.
/// `KILN_CUDA_TILED_MACS` sets another bound, to measure where that is on a card.
const TILED_MACS: usize = 1 << 27;

fn tiled_macs() -> usize {
    static MACS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::bound_from_env(&MACS, "KILN_CUDA_TILED_MACS", TILED_MACS)
}

/// Tiles times slices aimed for: about one and a half blocks for each of an H100's 132 SMs.
/// Measured there (`cargo bench --bench products`, the workloads' 31 tiled products; figures in
/// `benches/results/h100-2026-11-27`), `TilePlan::for_product`'s choice came within 4% of the
/// best tiling of each product (geometric mean), where the rule before it (264 blocks, 64x64
/// tiles from 16 of them up, slices two slabs deep) was 23% off.
const TARGET_BLOCKS: usize = 200;

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

/// Static shared memory a block may declare.
const SHARED_BYTES: usize = 48 * 1024;

/// Threads per block along each side of the tile.
const SIDE: usize = 16;

/// The shapes of tile the tiled product comes in (256 threads a block each). kiln picks 32x32,
/// 64x64 or 128x64 (`SHAPES_BY_SIZE`); 128x128 only when asked (`with_tile_choice`, a tile
/// table), to measure it on a card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileShape {
    /// 2x2 outputs a thread, 16 apart.
    T32x32,
    /// 4x4 adjacent outputs a thread, read from shared memory as `float4`s.
    T64x64,
    /// 8x4 outputs a thread.
    T128x64,
    /// 8x8 outputs a thread; an unsliced tile reaches its epilogue in two bands of 64 rows
    /// (the whole tile staged at once would pass the 48 KiB of shared memory).
    T128x128,
    /// 32x32 tiles computed by four groups of 64 threads, each the whole tile (4x4 adjacent
    /// outputs a thread, read as `float4`s) over a quarter of each slab's depth, the four
    /// partial tiles added in group order in shared memory. A thread reads two `float4`s from
    /// shared memory for every 16 multiply-adds, where `T32x32`'s threads read a word for each
    /// (on tensor cores, the same as `T32x32`).
    T32x32K4,
}

impl TileShape {
    pub const ALL: [TileShape; 5] =
        [TileShape::T32x32, TileShape::T32x32K4, TileShape::T64x64, TileShape::T128x64, TileShape::T128x128];

    /// Rows, columns, and the inner dimension's slab.
    fn dims(self) -> (usize, usize, usize) {
        match self {
            TileShape::T32x32 | TileShape::T32x32K4 => (32, 32, 32),
            TileShape::T64x64 => (64, 64, 16),
            TileShape::T128x64 => (128, 64, 8),
            TileShape::T128x128 => (128, 128, 8),
        }
    }

    /// `rows`x`columns`, as the kernel's heading comment says it.
    pub fn label(self) -> String {
        let (bm, bn, _) = self.dims();
        let groups = if self == TileShape::T32x32K4 { "k4" } else { "" };
        format!("{bm}x{bn}{groups}")
    }

    /// The shape as its tiles are computed: on tensor cores a warp's multiply-adds cover the whole
    /// slab, so 32x32k4 tiles are 32x32 ones there.
    pub fn computed_as(self, tensor_cores: bool) -> TileShape {
        if tensor_cores && self == TileShape::T32x32K4 {
            TileShape::T32x32
        } else {
            self
        }
    }

    /// Groups of threads that split each slab's depth between them (by float32 FMAs).
    fn groups(self) -> usize {
        if self == TileShape::T32x32K4 {
            4
        } else {
            1
        }
    }
}

/// A choice of tiling that overrides kiln's own, for measuring the alternatives on a card
/// (`with_tile_choice`; the product benchmark, `benches/products.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TileChoice {
    /// `Some(false)`: every float product above the small-product size goes to cuBLAS;
    /// `Some(true)`: every one with an epilogue is tiled, whatever its size.
    pub tiled: Option<bool>,
    pub tile: Option<TileShape>,
    /// Slices of the inner dimension (at most one per slab).
    pub slices: Option<usize>,
    /// `Some(true)`: tiles computed on tensor cores (3xTF32); `Some(false)`: by float32 FMAs.
    pub tensor_cores: Option<bool>,
    /// Slab buffers filled by asynchronous copies (1: the next slab through registers; by float32
    /// FMAs only).
    pub stages: Option<usize>,
    /// `Some(true)`: a sliced tile's slices run as one thread block cluster and add their partial
    /// tiles through distributed shared memory (`cluster.rs`; 2 to 8 slices, the tile staged
    /// whole beside its slabs); `Some(false)`: through scratch memory and a ticket.
    pub cluster: Option<bool>,
}

impl TileChoice {
    /// Every product with an epilogue tiled, in `tile`s, its inner dimension in `slices`, by
    /// float32 FMAs or on tensor cores.
    pub fn forced(tile: TileShape, slices: usize, tensor_cores: bool) -> TileChoice {
        TileChoice {
            tiled: Some(true),
            tile: Some(tile),
            slices: Some(slices),
            tensor_cores: Some(tensor_cores),
            stages: None,
            cluster: None,
        }
    }
}

thread_local! {
    static CHOICE: std::cell::Cell<Option<TileChoice>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every CUDA program this thread specializes tiled as `choice` says (where it says
/// nothing, as kiln would).
pub fn with_tile_choice<R>(choice: TileChoice, f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&CHOICE, Some(choice), f)
}

/// How `mm` is to be tiled: this thread's `with_tile_choice`, else the tile table's line for it
/// (`tile_table`), else kiln's estimate (the fields left `None`).
fn choice(mm: &MatMul) -> TileChoice {
    CHOICE.with(|c| c.get()).or_else(|| super::tile_table::choice_for(mm)).unwrap_or_default()
}

/// Slab buffers where no choice says (`KILN_CUDA_STAGES`, default 1: opt-in until timed on a GPU).
fn stages_from_env() -> usize {
    static STAGES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::bound_from_env(&STAGES, "KILN_CUDA_STAGES", 1)
}

/// Whether tiles go to tensor cores where no choice says (`KILN_CUDA_TF32X3=1`; needs compute
/// capability 8.0 or newer).
fn tensor_cores_from_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_from_env(&ON, "KILN_CUDA_TF32X3", "1")
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
}

impl TilePlan {
    pub(super) fn for_product(mm: &MatMul) -> TilePlan {
        let tiles_in = |shape: TileShape| {
            let (bm, bn, _) = shape.dims();
            mm.m.div_ceil(bm) * mm.n.div_ceil(bn)
        };
        let deepest_cut = |shape: TileShape| (mm.k / shallowest_slice(shape)).clamp(1, MAX_SLICES);
        let choice = choice(mm);
        // Larger tiles do more arithmetic per byte staged, so the largest shape that still
        // gives the SMs enough blocks, counting the slices its inner dimension allows, and that
        // the output fills at least half of (a 4096x256x10 product took 15.1 us in 64x64 tiles
        // of four slices and 10.9 in whole 32x32 ones).
        let shape = choice.tile.unwrap_or_else(|| {
            let filled = |s: TileShape| {
                let (bm, bn, _) = s.dims();
                bm < 2 * mm.m && bn < 2 * mm.n
            };
            let enough = |s: &TileShape| filled(*s) && tiles_in(*s) * deepest_cut(*s) >= TARGET_BLOCKS;
            SHAPES_BY_SIZE.into_iter().find(enough).unwrap_or_else(smallest_shape)
        });
        let (bm, bn, bk) = shape.dims();
        let (tiles_m, tiles_n) = (mm.m.div_ceil(bm), mm.n.div_ceil(bn));
        let slabs_total = mm.k.div_ceil(bk).max(1);
        // Tiles enough for most of the target need no slices (they would only add partial tiles).
        let tiles = tiles_m * tiles_n;
        let wanted = if 2 * tiles >= TARGET_BLOCKS { 1 } else { TARGET_BLOCKS.div_ceil(tiles).min(deepest_cut(shape)) };
        // Clusters asked for: kiln's estimate cuts no more slices than a cluster holds.
        let clustered = choice.cluster.unwrap_or_else(super::cluster::requested);
        let wanted = if clustered { wanted.min(super::cluster::MAX_CLUSTER) } else { wanted };
        let wanted = choice.slices.map_or(wanted, |s| s.min(slabs_total));
        let slabs = slabs_total.div_ceil(wanted.max(1));
        let tensor_cores = choice.tensor_cores.unwrap_or_else(tensor_cores_from_env);
        // Tensor cores take their operands split when staged: through registers.
        let stages = if tensor_cores { 1 } else { choice.stages.unwrap_or_else(stages_from_env) };
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
            // A slice's slabs all in flight at once take `slabs + 1` buffers; more would stay empty.
            stages: stages.clamp(1, MAX_STAGES).min(slabs + 1),
            cluster: false,
        };
        // As many buffers as fit in shared memory beside a band of the staged tile.
        while plan.stages > 1 && !plan.fits_in_shared_memory() {
            plan.stages -= 1;
        }
        // A cluster's blocks read each other's whole staged tile, so it must fit beside the slabs.
        plan.cluster = clustered && (2..=super::cluster::MAX_CLUSTER).contains(&plan.slices) && plan.bands() == 1;
        plan
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
    /// spilled at three.
    pub(super) fn blocks_per_sm(&self) -> Option<u32> {
        let (rows, cols) = self.per_thread();
        if self.tensor_cores {
            Some(1)
        } else if self.stages > 1 {
            Some(if rows * cols <= 16 { 3 } else { 2 })
        } else {
            None
        }
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
    pub(super) fn pitch(&self, side: usize) -> usize {
        side + if self.tensor_cores || self.vectors() { 4 } else { 1 }
    }

    /// Words of shared memory that both operands' slab buffers take (high and low parts on tensor
    /// cores).
    pub(super) fn slab_words(&self) -> usize {
        let buffer = self.bk * (self.pitch(self.bm) + self.pitch(self.bn));
        buffer * self.stages * if self.tensor_cores { 2 } else { 1 }
    }

    /// Whether the slab buffers and the smallest band of the staged tile (the whole tile where
    /// groups add their copies) fit in a block's shared memory, with room for its flags.
    fn fits_in_shared_memory(&self) -> bool {
        let rows = if self.groups() > 1 { self.bm } else { 1 };
        (self.slab_words() + self.staged_words_of_their_own(rows)) * 4 + 16 <= SHARED_BYTES
    }

    /// Whether `rows` rows of the staged tile fit in `a`'s slab buffers, and are staged there:
    /// the slabs are dead once the slice's last one is multiplied (and every thread's copies have
    /// landed and the block has passed a barrier: `Emitter::tiled_elementwise`), so the shared
    /// memory the tile would take of its own goes to more slabs in flight (32x32 tiles in thread
    /// groups: five buffers, a 128-deep slice's four slabs all in flight, where three buffers and
    /// the groups' copies of the tile filled 48 KiB). Not on tensor cores, whose slabs hold words
    /// split in two.
    pub(super) fn staged_in_slabs(&self, rows: usize) -> bool {
        !self.tensor_cores && self.staged_words(rows) <= self.stages * self.bk * self.pitch(self.bm)
    }

    /// Words of shared memory that `rows` rows of the staged tile take beside the slabs.
    fn staged_words_of_their_own(&self, rows: usize) -> usize {
        if self.staged_in_slabs(rows) {
            0
        } else {
            self.staged_words(rows)
        }
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
            mma::output_row(self.bm, i)
        } else {
            lane_offset(self, "ty", i)
        }
    }

    /// The column of the tile that a thread's `j`-th output lies in.
    pub(super) fn out_col(&self, j: usize) -> Expr {
        if self.tensor_cores {
            mma::output_col(self.bn, j)
        } else {
            lane_offset(self, "tx", j)
        }
    }

    /// Bands of rows in which an unsliced tile is staged for its epilogue: the fewest that keep
    /// the block's static shared memory (both slabs and a band) within 48 KiB.
    pub(super) fn bands(&self) -> usize {
        let slabs = self.slab_words();
        let fits = |bands: usize| (slabs + self.staged_words_of_their_own(self.bm / bands)) * 4 <= SHARED_BYTES;
        (0..).map(|p| 1 << p).find(|&b| fits(b) || b >= self.bm).expect("a band of one row fits")
    }

    /// Words of one operand's slab that each thread stages.
    pub(super) fn loads_per_thread(&self, a: bool) -> usize {
        (if a { self.bm } else { self.bn }) * self.bk / THREADS as usize
    }
}

/// Whether tiled products are turned off (`KILN_CUDA_TILED=0`: every float product above the
/// small-product size goes to cuBLAS, to measure what tiling saves).
fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_from_env(&OFF, "KILN_CUDA_TILED", "0")
}

/// Whether `mm` is of a kind and size the tiled kernel takes (its epilogue is checked later).
pub(super) fn candidate(mm: &MatMul) -> bool {
    let wanted = choice(mm).tiled.unwrap_or(mm.m * mm.n * mm.k <= tiled_macs() && !disabled());
    mm.dtype == DType::F32
        && mm.batch == 1
        && mm.epilogue.is_some()
        && wanted
        && TilePlan::for_product(mm).blocks() <= MAX_GRID
        && !super::kernel_by_kernel_forced()
}

/// Whether `v` reads a row-major `[m, n]` buffer at the flat index of a row-major walk over
/// `shape` (then the tile's element `(row, col)` is the walk's element `row * n + col`). The
/// lowering only gives a product an epilogue that reads it so; this keeps tiling right should
/// that change.
fn walks_in_order(v: &crate::kernel::View, shape: &[usize]) -> bool {
    let mut expected = 1;
    for d in (0..shape.len()).rev() {
        if shape[d] > 1 && v.strides[d] != expected {
            return false;
        }
        expected *= shape[d] as isize;
    }
    v.offset == 0
}

/// The row (`a`) or column of the tile that a thread's `i`-th output lies in.
fn lane_offset(plan: &TilePlan, along: &str, i: usize) -> Expr {
    if plan.vectors() {
        // Runs of four adjacent outputs (a float4), a thread's runs `side` float4s apart.
        var(along) * int(4) + int((i % 4 + i / 4 * 4 * plan.side()) as i64)
    } else {
        var(along) + int((plan.side() * i) as i64)
    }
}

/// Name of the register holding a thread's output `(i, j)`.
pub(super) fn acc(i: usize, j: usize) -> String {
    format!("acc_{i}_{j}")
}

/// The multiply-adds of one slab, read from the slab buffers `slabs` (`a`'s, `b`'s): every step
/// along its depth, or, where groups of threads split it, the group's run of steps (a loop of
/// constant trip count, which NVRTC unrolls as it does the whole slab's).
fn slab_multiply(plan: &TilePlan, slabs: (&str, &str)) -> Stmt {
    if plan.tensor_cores {
        let pitches = (plan.pitch(plan.bm), plan.pitch(plan.bn));
        let products = mma::slab_step(plan.bm, plan.bn, pitches, acc);
        return Stmt::For {
            ty: CType::Int,
            var: "kk".into(),
            init: int(0),
            end: int(plan.bk as i64),
            step: int(mma::MMA_K as i64),
            body: products,
        };
    }
    let mut products = slab_products(plan, slabs);
    if plan.groups() > 1 {
        let depth = (plan.bk / plan.groups()) as i64;
        products.insert(0, decl(CType::Int, "kk", var("grp") * int(depth) + var("kq")));
        Stmt::For { ty: CType::Int, var: "kq".into(), init: int(0), end: int(depth), step: int(1), body: products }
    } else {
        Stmt::For {
            ty: CType::Int,
            var: "kk".into(),
            init: int(0),
            end: int(plan.bk as i64),
            step: int(1),
            body: products,
        }
    }
}

/// One step `kk` through the staged slabs: each thread's rows of `a` times its columns of `b`,
/// added to its outputs (read as `float4`s where the thread's outputs are adjacent).
fn slab_products(plan: &TilePlan, (slab_a, slab_b): (&str, &str)) -> Vec<Stmt> {
    let ft = CType::Float;
    let (tm, tn) = plan.per_thread();
    let (pitch_a, pitch_b) = (plan.pitch(plan.bm), plan.pitch(plan.bn));
    let mut step = vec![];
    if plan.vectors() {
        // A thread's `per` rows (columns) are `per / 4` float4s, `side` float4s apart: a quarter
        // warp's eight threads then read eight float4s in a row, all 32 banks (adjacent runs of
        // eight, as before, put two threads in each bank for 128-wide tiles).
        for (name, tile, pitch, along, per) in [("a", slab_a, pitch_a, "ty", tm), ("b", slab_b, pitch_b, "tx", tn)] {
            let base = var(tile) + var("kk") * int(pitch as i64);
            for q in 0..per / 4 {
                let at = var(along) * int(1) + int((q * plan.side()) as i64);
                step.push(decl(CType::Float4, format!("{name}{q}"), Expr::Vec4(Box::new(base.clone()), Box::new(at))));
            }
        }
        let lane = |v: &str, i: usize| Expr::Lane(Box::new(var(format!("{v}{}", i / 4))), (i % 4) as u8);
        for i in 0..tm {
            for j in 0..tn {
                step.push(assign(var(acc(i, j)), var(acc(i, j)) + lane("a", i) * lane("b", j)));
            }
        }
    } else {
        for i in 0..tm {
            let at = var("kk") * int(pitch_a as i64) + lane_offset(plan, "ty", i);
            step.push(decl(ft, format!("a{i}"), index(var(slab_a), at)));
        }
        for j in 0..tn {
            let at = var("kk") * int(pitch_b as i64) + lane_offset(plan, "tx", j);
            step.push(decl(ft, format!("b{j}"), index(var(slab_b), at)));
        }
        for i in 0..tm {
            for j in 0..tn {
                step.push(assign(var(acc(i, j)), var(acc(i, j)) + var(format!("a{i}")) * var(format!("b{j}"))));
            }
        }
    }
    step
}

impl<'a> Emitter<'a> {
    /// The tiled form of `mm` inside its epilogue group `members`, if the group allows it: as for a
    /// small product computed in its epilogue (`product_in_epilogue`), and the group elementwise
    /// over exactly the product's elements, read in order.
    pub(super) fn tiled_product(&self, mm: &MatMul, members: &[&LoopKernel], at: usize) -> Option<ProductInEpilogue> {
        let epilogue = members[0];
        if members.iter().any(|k| k.reduce.is_some()) || epilogue.shape.iter().product::<usize>() != mm.m * mm.n {
            return None;
        }
        let p = self.product_in_epilogue(mm, members, at)?;
        walks_in_order(&epilogue.inputs[p.input], &epilogue.shape)
            .then(|| ProductInEpilogue { tiled: Some(TilePlan::for_product(mm)), ..p })
    }

    /// The body and launch of the group being emitted when it computes a tiled product: the tile's
    /// product (sliced or whole), then the epilogue group over the tile's elements, `tile_value`
    /// being the product's value at each.
    pub(super) fn tiled_elementwise(&mut self, plan: TilePlan) -> (Vec<Stmt>, Launch) {
        let mm = self.product.as_ref().expect("a tiled group has its product").mm.clone();
        let primary = self.group[0].kernel.clone();
        let TilePlan { bm, bn, bk, tiles_m, tiles_n, slices, slabs, .. } = plan;
        let (m, n, k) = (mm.m, mm.n, mm.k);
        let big = |x: usize| x >= i32::MAX as usize / 2;
        let lens = [m * n * slices, self.kp.buffers[mm.a].len, self.kp.buffers[mm.b].len];
        let it = if lens.iter().any(|&l| big(l)) || self.index_type(&primary) == CType::LongLong {
            CType::LongLong
        } else {
            CType::Int
        };
        let ft = CType::Float;
        let (tm, tn) = plan.per_thread();
        let (pitch_a, pitch_b) = (plan.pitch(bm), plan.pitch(bn));
        let align = if plan.vectors() { 16 } else { 0 };
        let tid = || cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx));
        // Tensor cores take each operand element as its TF32 high and low parts, split once when
        // staged and kept side by side (one 8-byte access reads both).
        let slab_type = if plan.tensor_cores {
            self.scalars.tensor_cores = true;
            CType::UInt2
        } else {
            ft
        };
        let mut body = vec![
            Stmt::SharedArray { ty: slab_type, name: "tile_a".into(), len: plan.stages * bk * pitch_a, align },
            Stmt::SharedArray { ty: slab_type, name: "tile_b".into(), len: plan.stages * bk * pitch_b, align },
        ];
        let mut setup = if plan.tensor_cores {
            mma::places()
        } else {
            let side = plan.side() as i64;
            let mut places = vec![decl(CType::Int, "tx", tid() % int(side))];
            if plan.groups() > 1 {
                places.push(decl(CType::Int, "ty", tid() / int(side) % int(side)));
                places.push(decl(CType::Int, "grp", tid() / int(plan.group_threads() as i64)));
            } else {
                places.push(decl(CType::Int, "ty", tid() / int(side)));
            }
            places
        };
        let block = || cast(it, Expr::Builtin(Builtin::BlockIdx));
        let tiles = (tiles_m * tiles_n) as i64;
        // A cluster is consecutive blocks, so a clustered tile's slices are.
        if plan.cluster {
            self.scalars.clusters = true;
            setup.push(decl(it, "tile", block() / int(slices as i64)));
            setup.push(decl(it, "slice", block() % int(slices as i64)));
        } else {
            setup.push(decl(it, "tile", block() % int(tiles)));
            setup.push(decl(it, "slice", block() / int(tiles)));
        }
        setup.push(decl(it, "row0", (var("tile") / int(tiles_n as i64)) * int(bm as i64)));
        setup.push(decl(it, "col0", (var("tile") % int(tiles_n as i64)) * int(bn as i64)));
        setup.push(decl(it, "k_lo", var("slice") * int((slabs * bk) as i64)));
        let hi = var("k_lo") + int((slabs * bk) as i64);
        setup.push(decl(it, "k_hi", select(bin(BinOp::Lt, hi.clone(), int(k as i64)), hi, int(k as i64))));
        for i in 0..tm {
            for j in 0..tn {
                setup.push(decl_mut(ft, acc(i, j), Expr::F32(0.0)));
            }
        }
        // Where in the slabs each thread stages its words (the same for every slab), and the
        // registers holding the next slab's words.
        for a in [true, false] {
            setup.extend(self.staging_places(&mm, &plan, a));
        }
        body.extend(setup);
        if plan.stages > 1 {
            body.extend(self.slabs_by_copies(&mm, &plan, it));
            // Staged in the slab buffers: not before every thread is done with them (the loop
            // with one buffer ends at a barrier).
            if plan.staged_rows().is_some_and(|rows| plan.staged_in_slabs(rows)) {
                body.push(Stmt::SyncThreads);
            }
        } else {
            body.extend(self.slabs_through_registers(&mm, &plan, it));
        }
        let (shared, finish) = if slices == 1 {
            self.whole_tile_finish(&mm, plan, it)
        } else if plan.cluster {
            self.clustered_tile_finish(&mm, plan, it)
        } else {
            self.sliced_tile_finish(&mm, plan, it)
        };
        body.splice(2..2, shared);
        body.extend(finish);
        let cluster = if plan.cluster { slices as u32 } else { 1 };
        (body, Launch { grid: (plan.blocks() as u32, 1), block: (THREADS, 1), cluster })
    }

    /// The loop over the slice's slabs with one slab buffer: each slab's words come from the
    /// registers loaded during the slab before (the first before the loop), are stored to the
    /// buffer, and multiplied once every thread has stored its words. The next slab's loads are
    /// issued before that barrier (their registers are free once stored): ptxas does not move
    /// instructions across a barrier, while after it, it placed them after the multiply-adds in
    /// some kernels (the autoencoder's 1000-wide forward layers in 64x64 tiles, 244 of 256
    /// multiply-adds in, and fmnist-mlp's second weight gradient: `cuda_source --loads`), so that
    /// each slab waited for memory in full.
    fn slabs_through_registers(&mut self, mm: &MatMul, plan: &TilePlan, it: CType) -> Vec<Stmt> {
        let (bk, pitch_a, pitch_b) = (plan.bk, plan.pitch(plan.bm), plan.pitch(plan.bn));
        let mut out = self.slab_fetch(mm, plan, it, var("k_lo"), true);
        let mut slab = vec![];
        for (tile, side, pitch) in [("tile_a", "a", pitch_a), ("tile_b", "b", pitch_b)] {
            for u in 0..plan.loads_per_thread(side == "a") {
                let at = var(format!("{side}_kk{u}")) * int(pitch as i64) + var(format!("{side}_r{u}"));
                let word = var(format!("{side}_next{u}"));
                if plan.tensor_cores {
                    let hi = format!("{side}_hi{u}");
                    slab.push(decl(CType::UInt, &hi, call(mma::HIGH_HELPER, vec![word.clone()])));
                    let lo = call(mma::LOW_HELPER, vec![word, var(&hi)]);
                    slab.push(assign(index(var(tile), at), call("make_uint2", vec![var(&hi), lo])));
                } else {
                    slab.push(assign(index(var(tile), at), word));
                }
            }
        }
        let next = var("kt") + int(bk as i64);
        slab.push(Stmt::If(
            bin(BinOp::Lt, next.clone(), var("k_hi")),
            self.slab_fetch(mm, plan, it, next, false),
            vec![],
        ));
        slab.push(Stmt::SyncThreads);
        slab.push(slab_multiply(plan, ("tile_a", "tile_b")));
        slab.push(Stmt::SyncThreads);
        out.push(Stmt::For {
            ty: it,
            var: "kt".into(),
            init: var("k_lo"),
            end: var("k_hi"),
            step: int(bk as i64),
            body: slab,
        });
        out
    }

    /// The loop over the slice's slabs with `stages` slab buffers filled by asynchronous copies:
    /// the first `stages - 1` slabs' copies issued before the loop, and in each turn, once the
    /// thread's copies of the slab have landed and the block has passed a barrier (so every
    /// thread's copies are in, and every thread is done with the buffer used a turn ago), the
    /// copies of the slab `stages - 1` ahead into that buffer, then the slab's multiply-adds.
    /// Each turn closes one group of copies, empty past the slice's end, so that the wait for all
    /// but the newest `stages - 2` groups is a wait for this turn's slab.
    fn slabs_by_copies(&mut self, mm: &MatMul, plan: &TilePlan, it: CType) -> Vec<Stmt> {
        let (bk, stages) = (plan.bk as i64, plan.stages);
        self.scalars.async_copies = self.scalars.async_copies.max(stages);
        let mut out = vec![];
        for s in 0..stages - 1 {
            let kt = var("k_lo") + int(s as i64 * bk);
            let copies = self.slab_copy(mm, plan, it, kt.clone(), int(s as i64));
            out.push(Stmt::If(bin(BinOp::Lt, kt, var("k_hi")), copies, vec![]));
            out.push(tile_staging::commit());
        }
        let ahead = var("kt") + int((stages - 1) as i64 * bk);
        let refill = (var("st") + int(stages as i64 - 1)) % int(stages as i64);
        let slab_at = |tile: &str, side: usize| var(tile) + var("st") * int(bk * plan.pitch(side) as i64);
        let turn = vec![
            decl(CType::Int, "st", cast(CType::Int, (var("kt") - var("k_lo")) / int(bk) % int(stages as i64))),
            tile_staging::wait(stages - 2),
            Stmt::SyncThreads,
            Stmt::If(bin(BinOp::Lt, ahead.clone(), var("k_hi")), self.slab_copy(mm, plan, it, ahead, refill), vec![]),
            tile_staging::commit(),
            decl_mut(CType::ConstFloatPtr, "slab_a", slab_at("tile_a", plan.bm)),
            decl_mut(CType::ConstFloatPtr, "slab_b", slab_at("tile_b", plan.bn)),
            slab_multiply(plan, ("slab_a", "slab_b")),
        ];
        out.push(Stmt::For {
            ty: it,
            var: "kt".into(),
            init: var("k_lo"),
            end: var("k_hi"),
            step: int(bk),
            body: turn,
        });
        // The groups left are empty (nothing copied past the slice): no copy outlives the loop.
        out.push(tile_staging::wait(0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Tensor cores stage their operands split, through registers.
        assert_eq!(stages(TileShape::T64x64, 3, true).stages, 1);
        assert_eq!(stages(TileShape::T64x64, 1, false).stages, 1);
        // As deep as fits: 128x64 slabs are 8 deep (6.25 KiB a buffer), so seven buffers (six
        // slabs in flight); 64x64 ones (8.5 KiB) five.
        let deep = stages(TileShape::T128x64, MAX_STAGES, false);
        assert_eq!((deep.stages, deep.fits_in_shared_memory()), (7, true));
        assert_eq!(stages(TileShape::T64x64, MAX_STAGES, false).stages, 5);
        // No more buffers than the slice has slabs, plus the one being multiplied: a 128-deep
        // inner dim in four 32-deep slabs takes five.
        let shallow = TileChoice { stages: Some(MAX_STAGES), ..TileChoice::forced(TileShape::T32x32, 1, false) };
        let plan = with_tile_choice(shallow, || TilePlan::for_product(&product(128, 128, 256)));
        assert_eq!((plan.slabs, plan.stages), (4, 5));
    }
}
