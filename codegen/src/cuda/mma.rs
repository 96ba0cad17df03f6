//! Tiled products on tensor cores at float32 accuracy (3xTF32). Each operand element is split
//! once a block into a TF32 high part and a TF32 low part (`x = hi + lo` to
//! within 2^-21 |x|), and each product is `lo*hi + hi*lo + hi*hi`, three `mma.sync.m16n8k8` with
//! float32 accumulators (`lo*lo`, below float32's rounding, is left out). So a product keeps
//! float32's accuracy, as the peers are measured (TF32 off), while running on the tensor cores:
//! about twice the error of float32 FMAs (each term rounds the accumulator three times, not
//! once), where a single TF32 product is some hundred times worse. (Summing each piece's two small
//! terms apart, from zero, and adding them once brings the error down to the FMAs' (8.9e-6
//! against 8.7e-6 on fmnist-mlp's first layer, emulated) but costs ptxas 10 to 50 more registers
//! a thread: 126-129 for the 64x64 and 128x64 tiles, about 200 for 128x128. Speed is what the
//! tensor cores are for, so the accumulator takes all three until a GPU says otherwise.)
//!
//! This module owns what differs from the float32 tiles: the prelude's helpers (the split, robust
//! to infinities, NaNs and values that would round past the largest float; and the multiply-add,
//! inline PTX on the GPU and the shim's `kiln_emu_mma_tf32` in the emulator, which follows the PTX
//! ISA's fragment layout), where a thread's outputs lie in the tile, and one slab step. A block's
//! 8 warps cover the tile in a grid of 2x4 warp tiles, or 4x2 where that makes them squarer
//! (128x64 tiles: `warp_grid`, a fifth less shared memory read for fragments); a thread's output
//! `(i, j)` is the accumulator `i % 2 * 2 + j % 2` of the warp's 16x8 product `(i / 2, j / 2)`.
//!
//! A slab is split in one of two places. Staged through registers (one slab buffer), each
//! thread splits the words it stores, and the buffer holds each element's two parts side by side
//! (`slab_step`). Copied asynchronously (`TilePlan::split_slabs`: the slabs in flight are the
//! words as copied, since a copy cannot split them), the block splits the slab it is about to
//! multiply into arrays of its own, laid out a lane's fragment after another (`split_slab`,
//! `split_slab_step`): a thread splits whole fragments, and a warp reads each part of an `a`
//! fragment, and both parts of a `b` fragment, with one 16-byte access into the registers the
//! multiply-add takes. Where two sets of those arrays fit, the block splits the next slab into one
//! while it multiplies from the other (`TilePlan::split_ahead`).

use super::ast::*;

/// The prelude helper doing one warp's multiply-add (kernels calling it run as fibers in the
/// emulator: every lane must reach it).
pub(crate) const MMA_HELPER: &str = "kiln_mma_tf32";
pub(crate) const HIGH_HELPER: &str = "kiln_tf32_hi";
pub(crate) const LOW_HELPER: &str = "kiln_tf32_lo";

/// The grids of a block's 8 warps over its tile (rows by columns) that a tile may take.
const WARP_GRIDS: [(usize, usize); 2] = [(2, 4), (4, 2)];
/// The shape of one `mma.sync`: 16x8 outputs, 8 along the inner dimension.
const MMA_M: usize = 16;
const MMA_N: usize = 8;
pub(super) const MMA_K: usize = 8;

/// Where each register of a lane's fragment lies, as (row, step) offsets from the lane's
/// (`group`, `quad`) within the operand's band and step of 8 (the PTX ISA's layout for
/// `m16n8k8` TF32): `a`'s four, rows `group` and `group + 8` by steps `quad` and `quad + 4`;
/// `b`'s two (its rows the tile's columns), steps `quad` and `quad + 4`.
const A_FRAGMENT: [(usize, usize); 4] = [(0, 0), (8, 0), (0, 4), (8, 4)];
const B_FRAGMENT: [(usize, usize); 2] = [(0, 0), (0, 4)];

/// The bits a TF32 keeps (sign, exponent, 10 bits of mantissa), and half of its last place.
const TF32_BITS: u32 = 0xffff_e000;
const TF32_HALF_ULP: u32 = 0x1000;
/// The least magnitude whose TF32 rounding passes the largest float.
const ROUNDS_PAST_MAX: u32 = 0x7f7f_f000;
/// The largest TF32.
const LARGEST_TF32: u32 = 0x7f7f_e000;

/// The prelude's tensor-core helpers: a float's high and low TF32 parts, and one warp's
/// multiply-add.
///
/// Before compute capability 9.0 the split is 6 instructions an element (it was 14, then 8): one
/// test, no select. The high part is `x` rounded to the nearest TF32 (ties away from zero) where
/// that is finite, else `x`'s bits less one, truncated: the largest TF32 for a value rounding past
/// the largest float and for an infinity, whose low part is then the infinity itself. So an
/// infinity keeps its sign and its infinity in every product: `inf * 1.0` is
/// `lo*hi + hi*lo + hi*hi` = `inf + max*0 + max*1`, where a high part of `inf` and a low part of 0
/// gave `inf*0`, a NaN. A NaN's low part is a NaN (its high part may be an infinity, where its
/// payload lies in the bits a TF32 drops). The low part is truncated, as CUTLASS's 3xTF32 takes
/// its small part: rounding it cost two instructions more and a test of its own (lest the
/// rounding carry past the largest float or into a NaN's sign), for an error of at most 2^-21 |x|
/// rather than 2^-22, where each product's three roundings of the accumulator are some 2^-24 of
/// the sum each.
///
/// From compute capability 9.0 (`cvt.rn.tf32.f32`, one `F2FP` instruction) the high part is `x`
/// clamped to the largest TF32's magnitude, then rounded to the nearest TF32 (ties to even): two
/// `FMNMX` and the conversion, 5 instructions an element, with the same parts but for ties (and a
/// NaN's high part, then minus the largest TF32, its low part still a NaN). Before 9.0 PTX rounds
/// to TF32 only with ties away from zero (`cvt.rna`: four instructions in an sm_90 cubin, as many
/// as the integer rounding above, and no safer past the largest float).
pub(super) fn helpers() -> Vec<DeviceFn> {
    let u = CType::UInt;
    let high = DeviceFn {
        ret: u,
        name: HIGH_HELPER,
        params: vec![(CType::Float, "x")],
        outputs: 0,
        body: if super::target_capability() >= 90 { converted_high() } else { integer_high() },
    };
    let low = DeviceFn {
        ret: u,
        name: LOW_HELPER,
        params: vec![(CType::Float, "x"), (u, "hi")],
        outputs: 0,
        body: vec![
            Stmt::Comment(
                "The difference is exact where x is finite; an infinity less the largest TF32 is the \
                 infinity, a NaN less anything a NaN (its quiet bit survives the truncation)."
                    .into(),
            ),
            Stmt::ReturnValue(bin(
                BinOp::BitAnd,
                call("__float_as_uint", vec![var("x") - call("__uint_as_float", vec![var("hi")])]),
                Expr::UInt(TF32_BITS),
            )),
        ],
    };
    let d = ["d0", "d1", "d2", "d3"];
    let ins = ["a0", "a1", "a2", "a3", "b0", "b1"];
    let mut params: Vec<(CType, &'static str)> = d.iter().map(|&n| (CType::Float, n)).collect();
    params.extend(ins.iter().map(|&n| (u, n)));
    let multiply_add = DeviceFn {
        ret: CType::Void,
        name: MMA_HELPER,
        params,
        outputs: d.len(),
        body: vec![Stmt::Asm {
            ptx: "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 \
                  {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};",
            outputs: d.iter().map(|&n| ("+f", var(n))).collect(),
            inputs: ins.iter().map(|&n| ("r", var(n))).collect(),
            memory: false,
            emulated: call("kiln_emu_mma_tf32", d.iter().chain(&ins).map(|&n| var(n)).collect()),
        }],
    };
    vec![high, low, multiply_add]
}

/// The high part rounded by integer arithmetic: where `x` rounds to a finite TF32, half a TF32's
/// last place added, else one taken away, then truncated.
fn integer_high() -> Vec<Stmt> {
    let rounds_finite =
        bin(BinOp::Lt, call("fabsf", vec![var("x")]), call("__uint_as_float", vec![Expr::UInt(ROUNDS_PAST_MAX)]));
    let add = select(rounds_finite, Expr::UInt(TF32_HALF_ULP), Expr::UInt(u32::MAX));
    vec![Stmt::ReturnValue(bin(BinOp::BitAnd, call("__float_as_uint", vec![var("x")]) + add, Expr::UInt(TF32_BITS)))]
}

/// The high part by the conversion of compute capability 9.0 (`cvt.rn.tf32.f32`; the emulator's
/// `kiln_emu_cvt_rn_tf32` rounds alike) of `x` clamped to the largest TF32's magnitude: an
/// infinity, and a value that would round past the largest float, become the largest TF32 (of
/// their sign); a NaN minus the largest (`fmaxf` and `fminf` keep the number).
fn converted_high() -> Vec<Stmt> {
    let largest = || call("__uint_as_float", vec![Expr::UInt(LARGEST_TF32)]);
    let clamped = call("fminf", vec![call("fmaxf", vec![var("x"), Expr::Neg(Box::new(largest()))]), largest()]);
    vec![
        decl(CType::Float, "clamped", clamped),
        decl_mut(CType::UInt, "hi", Expr::UInt(0)),
        Stmt::Asm {
            ptx: "cvt.rn.tf32.f32 %0, %1;",
            outputs: vec![("=r", var("hi"))],
            inputs: vec![("f", var("clamped"))],
            memory: false,
            emulated: call("kiln_emu_cvt_rn_tf32", vec![var("hi"), var("clamped")]),
        },
        Stmt::ReturnValue(var("hi")),
    ]
}

/// The warps of a `bm`x`bn` tile, rows by columns: of `WARP_GRIDS`, the one whose warp tiles
/// are the squarest (2x4 where both are). A warp loads, for each step of 8, a fragment of each
/// part of `a` (512 bytes each) for each 16 rows of its tile and one of both parts of `b` (512
/// bytes) for each 8 columns, for three multiply-adds for each 16x8 of it: `(8192 / rows + 8192 /
/// columns) / 3` bytes of shared memory a multiply-add, the least where the warp tile is square.
/// Every lane reads bytes of its own, so a fragment's load takes the shared memory's full
/// 128 bytes a cycle four times over; at one `mma` a cycle an SM, a 64x16 warp tile (128x64 tiles
/// in 2x4) would need 1.67 cycles of loads for each, a 32x32 one (in 4x2) 1.33.
pub(super) fn warp_grid(bm: usize, bn: usize) -> (usize, usize) {
    let fits = |&(rows, cols): &(usize, usize)| bm / rows >= MMA_M && bn / cols >= MMA_N;
    // 1/m + 1/n by its numerator over a common denominator, `bm * bn` (the same for every grid).
    let bytes = |&(rows, cols): &(usize, usize)| rows * bn + cols * bm;
    let mut grids = WARP_GRIDS.iter().filter(|g| fits(g));
    let first = *grids.next().expect("a tile of at least 32x32");
    grids.fold(first, |best, g| if bytes(g) < bytes(&best) { *g } else { best })
}

/// Declares the thread's place in the warp grid of a `bm`x`bn` tile (`warp_grid`): `warp_row`,
/// `warp_col`, and within its warp `group` (lane / 4: a fragment's row) and `quad` (lane % 4: its
/// column).
pub(super) fn places(bm: usize, bn: usize) -> Vec<Stmt> {
    let tid = || cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx));
    let (_, cols) = warp_grid(bm, bn);
    vec![
        decl(CType::Int, "warp_row", tid() / int(32) / int(cols as i64)),
        decl(CType::Int, "warp_col", tid() / int(32) % int(cols as i64)),
        decl(CType::Int, "group", tid() % int(32) / int(4)),
        decl(CType::Int, "quad", tid() % int(4)),
    ]
}

/// A warp's tile of a `bm`x`bn` tile: its rows and columns.
fn warp_tile(bm: usize, bn: usize) -> (usize, usize) {
    let (rows, cols) = warp_grid(bm, bn);
    (bm / rows, bn / cols)
}

/// A thread's outputs along rows and columns, for a `bm`x`bn` tile.
pub(super) fn per_thread(bm: usize, bn: usize) -> (usize, usize) {
    let (wm, wn) = warp_tile(bm, bn);
    (wm / MMA_M * 2, wn / MMA_N * 2)
}

/// The row within a `bm`x`bn` tile of a thread's `i`-th row of outputs: fragment rows `group` and
/// `group + 8` of the warp's `i / 2`-th 16-row product.
pub(super) fn output_row((bm, bn): (usize, usize), i: usize) -> Expr {
    let wm = warp_tile(bm, bn).0;
    var("warp_row") * int(wm as i64) + int((i / 2 * MMA_M + i % 2 * 8) as i64) + var("group")
}

/// The column within a `bm`x`bn` tile of a thread's `j`-th column of outputs: fragment columns
/// `2 quad` and `2 quad + 1` of the warp's `j / 2`-th 8-column product.
pub(super) fn output_col((bm, bn): (usize, usize), j: usize) -> Expr {
    let wn = warp_tile(bm, bn).1;
    var("warp_col") * int(wn as i64) + int((j / 2 * MMA_N + j % 2) as i64) + var("quad") * int(2)
}

/// The statements of one step of 8 in the order that keeps the fewest fragments live: all of one
/// operand's fragments (`load_a(mi)` for each of the warp's 16-row bands, `load_b(nj)` for each of
/// its 8-column bands), then each band of the other's with its products (`products(mi, nj)`).
/// `b`-first (as every shape but 128x64 tiles in 4x2 takes it) holds `warp_bands.1` fragments of 4
/// registers and one of `a`'s 8; `a`-first `warp_bands.0` of 8 and one of 4. Each accumulator
/// gets its three multiply-adds in the same order either way.
fn in_fragment_order(
    warp_bands: (usize, usize),
    load_a: impl Fn(usize) -> Vec<Stmt>,
    load_b: impl Fn(usize) -> Vec<Stmt>,
    products: impl Fn(usize, usize) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let (bands_a, bands_b) = warp_bands;
    let mut out = vec![];
    if 4 * bands_b + 8 <= 8 * bands_a + 4 {
        // All of b's fragments first, then one 16-row band of a's at a time with its products.
        out.extend((0..bands_b).flat_map(&load_b));
        for mi in 0..bands_a {
            out.extend(load_a(mi));
            out.extend((0..bands_b).flat_map(|nj| products(mi, nj)));
        }
    } else {
        out.extend((0..bands_a).flat_map(&load_a));
        for nj in 0..bands_b {
            out.extend(load_b(nj));
            out.extend((0..bands_a).flat_map(|mi| products(mi, nj)));
        }
    }
    out
}

/// One step of 8 along the staged slabs (`kk` its first): each warp's fragments of both operands
/// (from `slabs`, `a`'s and `b`'s: each element's high and low parts as a `uint2`, stored
/// `[kk][row]` with the given pitches), then three multiply-adds per 16x8 product into the
/// accumulators `acc(i, j)`.
pub(super) fn slab_step(
    bm: usize,
    bn: usize,
    pitches: (usize, usize),
    (slab_a, slab_b): (&str, &str),
    acc: impl Fn(usize, usize) -> String,
) -> Vec<Stmt> {
    let (tm, tn) = per_thread(bm, bn);
    let (wm, wn) = warp_tile(bm, bn);
    let (pitch_a, pitch_b) = (pitches.0 as i64, pitches.1 as i64);
    let load_b = |nj: usize| -> Vec<Stmt> {
        let load = |(r, &(_, kk)): (usize, &(usize, usize))| {
            let kk = var("kk") + var("quad") + int(kk as i64);
            let col = var("warp_col") * int(wn as i64) + int((nj * MMA_N) as i64) + var("group");
            decl(CType::UInt2, format!("b{nj}_{r}"), index(var(slab_b), kk * int(pitch_b) + col))
        };
        B_FRAGMENT.iter().enumerate().map(load).collect()
    };
    let load_a = |mi: usize| -> Vec<Stmt> {
        let load = |(r, &(row, kk)): (usize, &(usize, usize))| {
            let kk = var("kk") + var("quad") + int(kk as i64);
            let row = var("warp_row") * int(wm as i64) + int((mi * MMA_M + row) as i64) + var("group");
            decl(CType::UInt2, format!("a{mi}_{r}"), index(var(slab_a), kk * int(pitch_a) + row))
        };
        A_FRAGMENT.iter().enumerate().map(load).collect()
    };
    // `.x` is a word's high part, `.y` its low part.
    let parts = |name: &str, n: usize, hi: bool| {
        (0..n).map(|r| Expr::Lane(Box::new(var(format!("{name}_{r}"))), if hi { 0 } else { 1 })).collect()
    };
    let products = |mi: usize, nj: usize| {
        let (a, b) = (format!("a{mi}"), format!("b{nj}"));
        three_products(&acc, mi, nj, |hi| parts(&a, A_FRAGMENT.len(), hi), |hi| parts(&b, B_FRAGMENT.len(), hi))
    };
    in_fragment_order((tm / 2, tn / 2), load_a, load_b, products)
}

/// The three multiply-adds of the 16x8 product (`mi`, `nj`) into its accumulators: low times
/// high, high times low, then high times high, the small terms first so that the large one
/// lands on a sum that already holds them. `a(hi)` and `b(hi)` are the fragments' registers of
/// the high (`true`) or the low parts.
fn three_products(
    acc: impl Fn(usize, usize) -> String,
    mi: usize,
    nj: usize,
    a: impl Fn(bool) -> Vec<Expr>,
    b: impl Fn(bool) -> Vec<Expr>,
) -> Vec<Stmt> {
    let d = [acc(2 * mi, 2 * nj), acc(2 * mi, 2 * nj + 1), acc(2 * mi + 1, 2 * nj), acc(2 * mi + 1, 2 * nj + 1)];
    [(false, true), (true, false), (true, true)]
        .into_iter()
        .map(|(a_hi, b_hi)| {
            let mut args: Vec<Expr> = d.iter().map(var).collect();
            args.extend(a(a_hi));
            args.extend(b(b_hi));
            Stmt::Call(call(MMA_HELPER, args))
        })
        .collect()
}

/// Bands of 16 rows of `a`'s slab and of 8 columns of `b`'s: what one `mma.sync` reads of each.
fn bands(bm: usize, bn: usize) -> (usize, usize) {
    (bm / MMA_M, bn / MMA_N)
}

/// The shared arrays a slab copied as it is gets split into (`TilePlan::split_slabs`): the high and
/// the low parts of `a`'s, a `uint4` for each lane's fragment of each 16-row band and step of 8,
/// and `b`'s, a `uint4` for each lane's fragment of each 8-column band and step, its two high parts
/// then its two low parts. In this order a warp reads each of `a`'s fragment's parts and both of
/// `b`'s with one 16-byte access a lane, and they land in the registers the multiply-add takes
/// them from: through `uint2`s of one element's two parts, ptxas moved each part into place (110
/// moves a turn beside 24 multiply-adds of a 128x64 tile). (`b`'s parts in arrays of their own
/// took two 8-byte accesses where one 16-byte access does: as many bytes and bank cycles, one
/// instruction more a fragment, to load and to store.)
///
/// With `buffers` of them (two where the block splits a slab a turn ahead:
/// `TilePlan::split_ahead`), the arrays hold each buffer's slots one after another
/// (`split_slots`).
pub(super) fn split_arrays(bm: usize, bn: usize, bk: usize, buffers: usize) -> Vec<Stmt> {
    let (a_slots, b_slots) = split_slots(bm, bn, bk);
    let (a_slots, b_slots) = (a_slots * buffers, b_slots * buffers);
    let array = |ty, name: &str, len| Stmt::SharedArray { ty, name: name.into(), len, align: 0 };
    vec![
        array(CType::UInt4, "split_a_hi", a_slots),
        array(CType::UInt4, "split_a_lo", a_slots),
        array(CType::UInt4, "split_b", b_slots),
    ]
}

/// The slots of one split slab in `a`'s arrays and in `b`'s: a lane's fragment each.
fn split_slots(bm: usize, bn: usize, bk: usize) -> (usize, usize) {
    (bm * bk / A_FRAGMENT.len(), bn * bk / B_FRAGMENT.len())
}

/// Slot `slot` of split buffer `buffer` (`None`: the one buffer) in an array of `slots` a buffer.
fn in_buffer(buffer: &Option<Expr>, slots: usize, slot: Expr) -> Expr {
    match buffer {
        Some(b) => b.clone() * int(slots as i64) + slot,
        None => slot,
    }
}

/// How a copied slab lies in its buffer, for the split to read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlabLayout {
    /// `[kk][row]`, a step's rows `pitch` words apart.
    Steps { pitch: usize },
    /// `[row][kk]`, rows of the slab's depth, swizzled (`tile_staging::rows_major_step`).
    Rows,
}

/// Splits the slab just landed in `slab_a` and `slab_b` (words as copied, laid out as
/// `layouts` say) into `split_arrays`: into the one split buffer, then waits for the block; or,
/// split a turn ahead, into buffer `into` (the next turn's barrier is the wait). Each thread
/// splits whole fragments, `a`'s four words (rows `group` and `group + 8`, steps `quad` and
/// `quad + 4` of its band) or `b`'s two, so that its stores are one access a part (both parts,
/// for `b`); a warp's reads of one word of its fragments, steps `quad` by rows `group`, fall in 32
/// banks with the pitches 8 past a multiple of 32 (or rows of the depth, swizzled). Once a block
/// rather than once for every warp that multiplies a word (the four warps of a tile's row all
/// read its `a`). The split arrays are free to write once the turn's first barrier is past: every
/// warp is done multiplying the slab before.
pub(super) fn split_slab(
    (bm, bn, bk): (usize, usize, usize),
    (layout_a, layout_b): (SlabLayout, SlabLayout),
    into: Option<Expr>,
) -> Vec<Stmt> {
    let (a_slots, b_slots) = split_slots(bm, bn, bk);
    let mut out = split_operand("a", bm, MMA_M, bk, layout_a, &A_FRAGMENT, |slot| in_buffer(&into, a_slots, slot));
    out.extend(split_operand("b", bn, MMA_N, bk, layout_b, &B_FRAGMENT, |slot| in_buffer(&into, b_slots, slot)));
    if into.is_none() {
        out.push(Stmt::SyncThreads);
    }
    out
}

/// `split_slab` for one operand (`side`): its slab `rows` (the tile's side) by `bk` steps, in
/// bands of `band_rows`, a lane's fragment the words `words`.
fn split_operand(
    side: &str,
    rows: usize,
    band_rows: usize,
    bk: usize,
    layout: SlabLayout,
    words: &[(usize, usize)],
    in_buffer: impl Fn(Expr) -> Expr,
) -> Vec<Stmt> {
    let tid = || cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx));
    let threads = super::emit::THREADS as usize;
    let (slots, bands) = (rows * bk / words.len(), rows / band_rows);
    debug_assert!(slots.is_multiple_of(threads), "a slab's fragments are whole for each thread");
    let mut out = vec![];
    for u in 0..slots / threads {
        // Slot `tid + u * threads`: its lane, then its band and step of 8 (each warp's 32 slots a
        // band and step).
        let lane = tid() % int(32);
        let band_step = tid() / int(32) + int((u * threads / 32) as i64);
        let (band, step) = (band_step.clone() % int(bands as i64), band_step / int(bands as i64));
        let first_kk = step * int(MMA_K as i64) + lane.clone() % int(4);
        let first_row = band * int(band_rows as i64) + lane / int(4);
        let name = |what: &str, w: usize| format!("{side}{u}_{what}{w}");
        for (w, &(row, kk)) in words.iter().enumerate() {
            let at = match layout {
                SlabLayout::Steps { pitch } => {
                    first_kk.clone() * int(pitch as i64) + first_row.clone() + int((kk * pitch + row) as i64)
                }
                SlabLayout::Rows => {
                    let (r, k) = (first_row.clone() + int(row as i64), first_kk.clone() + int(kk as i64));
                    r.clone() * int(bk as i64) + super::tile_staging::rows_major_step(r, k, Some(bk))
                }
            };
            out.push(decl(CType::Float, name("w", w), index(var(format!("slab_{side}")), at)));
            out.push(decl(CType::UInt, name("hi", w), call(HIGH_HELPER, vec![var(name("w", w))])));
        }
        let slot = in_buffer(tid() + int((u * threads) as i64));
        let his: Vec<Expr> = (0..words.len()).map(|w| var(name("hi", w))).collect();
        let los: Vec<Expr> =
            (0..words.len()).map(|w| call(LOW_HELPER, vec![var(name("w", w)), var(name("hi", w))])).collect();
        if words.len() == 4 {
            out.push(assign(index(var(format!("split_{side}_hi")), slot.clone()), call("make_uint4", his)));
            out.push(assign(index(var(format!("split_{side}_lo")), slot), call("make_uint4", los)));
        } else {
            // `b`'s two high parts and two low parts in one word of 16 bytes (`split_arrays`).
            let parts = his.into_iter().chain(los).collect();
            out.push(assign(index(var(format!("split_{side}")), slot), call("make_uint4", parts)));
        }
    }
    out
}

/// One step of 8 (`kk` its first) through the split slab (`split_slab`): each warp's fragments,
/// an access per part of `a`'s and one for both of `b`'s (`b`'s all first, then one 16-row band
/// of `a`'s at a time with its products, as `slab_step`), and three multiply-adds per 16x8 product
/// into the accumulators `acc(i, j)` (`three_products`); from split buffer `from` where the block
/// splits a turn ahead.
pub(super) fn split_slab_step(
    (bm, bn, bk): (usize, usize, usize),
    from: Option<Expr>,
    acc: impl Fn(usize, usize) -> String,
) -> Vec<Stmt> {
    let (a_slots, b_slots) = split_slots(bm, bn, bk);
    let (tm, tn) = per_thread(bm, bn);
    let (wm, wn) = warp_tile(bm, bn);
    let (bands_a, bands_b) = bands(bm, bn);
    let lane = || var("group") * int(4) + var("quad");
    let step = || var("kk") / int(MMA_K as i64);
    let load_b = |nj: usize| {
        let band = var("warp_col") * int((wn / MMA_N) as i64) + int(nj as i64);
        let slot = in_buffer(&from, b_slots, (step() * int(bands_b as i64) + band) * int(32) + lane());
        vec![decl(CType::UInt4, format!("b{nj}"), index(var("split_b"), slot))]
    };
    let load_a = |mi: usize| {
        let band = var("warp_row") * int((wm / MMA_M) as i64) + int(mi as i64);
        let slot = in_buffer(&from, a_slots, (step() * int(bands_a as i64) + band) * int(32) + lane());
        ["hi", "lo"]
            .map(|part| {
                decl(CType::UInt4, format!("a{mi}_{part}"), index(var(format!("split_a_{part}")), slot.clone()))
            })
            .to_vec()
    };
    let lanes = |name: String, n: u8| (0..n).map(|l| Expr::Lane(Box::new(var(name.clone())), l)).collect();
    // `b`'s high parts are its word's first two lanes, its low parts the last two.
    let b_parts = |nj: usize, hi: bool| {
        let first = if hi { 0 } else { 2 };
        (first..first + 2).map(|l| Expr::Lane(Box::new(var(format!("b{nj}"))), l)).collect()
    };
    let products = |mi: usize, nj: usize| {
        let part = |hi: bool| if hi { "hi" } else { "lo" };
        three_products(&acc, mi, nj, |hi| lanes(format!("a{mi}_{}", part(hi)), 4), |hi| b_parts(nj, hi))
    };
    in_fragment_order((tm / 2, tn / 2), load_a, load_b, products)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warps_cover_a_tile_in_the_grid_that_makes_their_tiles_squarest() {
        // 128x64 tiles in 4x2 (32x32 warp tiles: 1/32 + 1/32 of fragment bytes where 64x16 ones
        // read 1/64 + 1/16); where both grids are as square, or only one fits, 2x4.
        assert_eq!(warp_grid(128, 64), (4, 2));
        assert_eq!(per_thread(128, 64), (4, 8));
        for (bm, bn) in [(32, 32), (64, 64), (128, 128)] {
            assert_eq!(warp_grid(bm, bn), (2, 4), "{bm}x{bn}");
        }
        assert_eq!(per_thread(32, 32), (2, 2));
        // A thread's outputs are the tile's, each once.
        for (bm, bn) in [(32, 32), (64, 64), (128, 64), (128, 128)] {
            let (rows, cols) = warp_grid(bm, bn);
            let (tm, tn) = per_thread(bm, bn);
            assert_eq!(rows * cols * 32 * tm * tn, bm * bn, "{bm}x{bn}");
        }
    }
}
