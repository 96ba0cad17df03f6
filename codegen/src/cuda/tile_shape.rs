//! The shapes a tiled product's tiles come in (`TileShape`) and a choice of tiling that overrides
//! kiln's own estimate for a product (`TileChoice`: set for a thread by `with_tile_choice`, or by a
//! tile table's line): what the estimate (`tile_plan.rs`), the tile tables and the autotuner name
//! and pick from. A shape knows its sizes and how it is computed; the plan of a product's tiles
//! is `tile_plan.rs`'s.

use crate::kernel::MatMul;

/// The shapes of tile the tiled product comes in (256 threads a block each). kiln picks 32x32,
/// 64x64 or 128x64 (`tile_plan::SHAPES_BY_SIZE`); 128x128 only when asked (`with_tile_choice`, a
/// tile table), to measure it on a card.
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

    /// Rows, columns, and the inner dimension's slab: the shape's own depth, which a plan doubles
    /// for unsliced tiles whose slabs are copied asynchronously (`TilePlan::for_product`).
    pub(super) fn dims(self) -> (usize, usize, usize) {
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
    pub(super) fn groups(self) -> usize {
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
    /// Slab buffers filled by asynchronous copies (1: the next slab through registers).
    pub stages: Option<usize>,
    /// `Some(true)`: a sliced tile's slices run as one thread block cluster and add their partial
    /// tiles through distributed shared memory (`cluster.rs`; 2 to 8 slices, the tile staged
    /// whole beside its slabs); `Some(false)`: through scratch memory and a ticket.
    pub cluster: Option<bool>,
}

impl TileChoice {
    /// Every product with an epilogue tiled, in `tile`s, its inner dimension in `slices`, by
    /// float32 FMAs or on tensor cores.
    /// One slab buffer and no cluster: what its label, `RxC/sN`, says whatever kiln's defaults.
    pub fn forced(tile: TileShape, slices: usize, tensor_cores: bool) -> TileChoice {
        TileChoice {
            tiled: Some(true),
            tile: Some(tile),
            slices: Some(slices),
            tensor_cores: Some(tensor_cores),
            stages: Some(1),
            cluster: Some(false),
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
pub(super) fn choice(mm: &MatMul) -> TileChoice {
    CHOICE.with(|c| c.get()).or_else(|| super::tile_table::choice_for(mm)).unwrap_or_default()
}
