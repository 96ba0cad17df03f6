//! How a tiled product's blocks bring each slab of both operands into shared memory (`tiled.rs`):
//! where each thread stages its words, chosen so that a warp's loads are coalesced and its
//! stores to shared memory conflict-free, and the loads themselves: into registers one slab
//! ahead (stored to shared memory once the block has used the slab before), or, with stages
//! (by default 3 where the card has compute capability 8.0 or newer; `KILN_CUDA_STAGES=N`,
//! 1 <= N <= 8, or a tile table's `/pN` says otherwise), as asynchronous copies
//! (`cp.async`) straight into N slab buffers, N - 1 slabs in flight while the block multiplies
//! the oldest, so that a block with few slabs to go through waits for memory about once rather
//! than once a slab. A copy checks only the bounds its word can pass (`slab_words`), and an
//! operand goes four words (16 bytes) a copy where its layout allows (`copies`): one contiguous
//! along the tile's side, and the left one contiguous along the slab, whose slab is then staged
//! a row of the tile after another (`staged_rows_major`).
//!
//! The copies are the prelude's helpers: inline PTX on the GPU and, in the emulator, the shim's
//! `kiln_emu_cp_async*`, which keep each thread's copies pending until it waits for their group
//! (and poison the destination when the copy is issued), so a slab read before its wait and
//! barrier reads NaNs there and is a race under the race check, as on a GPU it reads stale words.

use super::ast::*;
use super::emit::{Emitter, THREADS};
use super::tiled::TilePlan;
use crate::kernel::MatMul;

/// The prelude's helper that copies one word of global memory to shared memory asynchronously
/// (zero when `inside` is false).
pub(crate) const COPY_HELPER: &str = "kiln_cp_async4";
/// The prelude's helper that copies four adjacent words (16 bytes, both addresses 16-byte aligned)
/// asynchronously, zeros when `inside` is false (`copies`).
pub(crate) const QUAD_COPY_HELPER: &str = "kiln_cp_async16";
/// Closes the thread's group of copies issued since the last.
const COMMIT_HELPER: &str = "kiln_cp_async_commit";

/// The helper that waits until all but the newest `pending` groups of the thread's copies have
/// landed (`cp.async.wait_group` takes its count as an immediate: a helper per count).
fn wait_helper(pending: usize) -> &'static str {
    WAITS[pending].0
}

/// Most stages a tile may ask for (so that `WAITS` has its count): seven slabs in flight (as
/// many as fit in shared memory are taken: `TilePlan::for_product`).
pub(super) const MAX_STAGES: usize = 8;

/// The wait helpers and their instructions, by how many of the newest groups may stay pending.
const WAITS: [(&str, &str); MAX_STAGES - 1] = [
    ("kiln_cp_async_wait0", "cp.async.wait_group 0;"),
    ("kiln_cp_async_wait1", "cp.async.wait_group 1;"),
    ("kiln_cp_async_wait2", "cp.async.wait_group 2;"),
    ("kiln_cp_async_wait3", "cp.async.wait_group 3;"),
    ("kiln_cp_async_wait4", "cp.async.wait_group 4;"),
    ("kiln_cp_async_wait5", "cp.async.wait_group 5;"),
    ("kiln_cp_async_wait6", "cp.async.wait_group 6;"),
];

/// The prelude's asynchronous-copy helpers, for a program whose tiles have `stages` slab buffers.
pub(super) fn helpers(stages: usize) -> Vec<DeviceFn> {
    let copy = copy_helper(COPY_HELPER, "cp.async.ca.shared.global [%0], [%1], 4, %2;", 4, "kiln_emu_cp_async4");
    // Through L2 only (`.cg`, which only 16-byte copies may take): a slab's words are read once by
    // the block, and by the blocks of other tiles from L2.
    let quad_copy =
        copy_helper(QUAD_COPY_HELPER, "cp.async.cg.shared.global [%0], [%1], 16, %2;", 16, "kiln_emu_cp_async16");
    let commit =
        DeviceFn::instruction(COMMIT_HELPER, "cp.async.commit_group;", false, call("kiln_emu_cp_async_commit", vec![]));
    // What the copies wrote may not be read before a wait.
    let waits = (0..=stages - 2).map(|pending| {
        DeviceFn::instruction(
            wait_helper(pending),
            WAITS[pending].1,
            true,
            call("kiln_emu_cp_async_wait", vec![int(pending as i64)]),
        )
    });
    [copy, quad_copy, commit].into_iter().chain(waits).collect()
}

/// A helper `name(dst, src, inside)` that copies `bytes` from global memory `src` to shared memory
/// `dst` by the instruction `ptx` (nothing read, zeros written, where `inside` is false), and
/// in the emulator by the shim's `emulated`.
fn copy_helper(name: &'static str, ptx: &'static str, bytes: u32, emulated: &'static str) -> DeviceFn {
    DeviceFn {
        ret: CType::Void,
        name,
        params: vec![(CType::FloatPtr, "dst"), (CType::ConstFloatPtr, "src"), (CType::Bool, "inside")],
        outputs: 0,
        body: vec![Stmt::Asm {
            ptx,
            outputs: vec![],
            inputs: vec![
                ("r", cast(CType::UInt, call("__cvta_generic_to_shared", vec![var("dst")]))),
                ("l", var("src")),
                ("r", select(var("inside"), Expr::UInt(bytes), Expr::UInt(0))),
            ],
            memory: false,
            emulated: call(emulated, vec![var("dst"), var("src"), var("inside")]),
        }],
    }
}

/// Closes the thread's group of copies.
pub(super) fn commit() -> Stmt {
    Stmt::Call(call(COMMIT_HELPER, vec![]))
}

/// Waits until all but the newest `pending` groups of the thread's copies have landed.
pub(super) fn wait(pending: usize) -> Stmt {
    Stmt::Call(call(wait_helper(pending), vec![]))
}

/// Whether an operand is copied a quad (16 bytes) at a time where it can be (`copies`):
/// `KILN_CUDA_QUAD_COPIES=0` copies it a word at a time, to time the two.
pub(super) static QUAD_COPIES: super::Switch = super::Switch::new("KILN_CUDA_QUAD_COPIES", true);

/// Runs `f` with every CUDA program this thread specializes copying slabs a quad at a time where
/// they can be (`on`), or a word at a time, whatever `KILN_CUDA_QUAD_COPIES` says.
pub fn with_quad_copies<R>(on: bool, f: impl FnOnce() -> R) -> R {
    QUAD_COPIES.with(on, f)
}

/// How a thread's copies move an operand's slab: a word at a time, or four adjacent words (a quad,
/// 16 bytes) along the tile's side or along the slab (`copies`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Copies {
    Words,
    /// Quads of adjacent rows (columns) of the tile: an operand contiguous along the tile's side.
    QuadsAlongSide,
    /// Quads of adjacent steps of the slab: an operand contiguous along the inner dimension
    /// (the left `[m, k]`: a layer's input, an input gradient's output gradient), staged
    /// `[row][kk]` rather than `[kk][row]` (`staged_rows_major`).
    QuadsAlongSlab,
}

/// How the left operand's (`a`) or the right's slabs are copied. Four adjacent words (16 bytes)
/// at a time, a quarter of the copies each with its address arithmetic, where the slabs are
/// copied asynchronously into buffers, the threads take the slab in whole quads, and every quad
/// starts on a 16-byte boundary of the operand (which starts on a 256-byte one) and lies inside
/// or outside the matrix and the slice whole:
/// - an operand contiguous along the tile's side (`a` stored `[k, m]`, `b` `[k, n]`: a weight's
///   columns, a weight gradient's operands) whose side is a multiple of four, into buffers whose
///   rows are a multiple of four words;
/// - the left operand contiguous along the slab (`[m, k]`) where the inner dimension is a
///   multiple of four and a thread's rows are one `float4` (4x4 outputs a thread, each group's
///   depth whole quads): its slab is staged a row of the tile after another, each row's quads
///   read whole by the multiply-adds (`staged_rows_major`). The right operand contiguous along
///   the slab stays a word a copy: its threads read four columns of a step, which a row-major
///   slab would put in one bank;
/// - either operand contiguous along the slab where the block splits each slab for tensor cores
///   (`TilePlan::split_slabs`): the split reads it a fragment's word at a time, rows by steps,
///   which a row-major slab serves in 32 banks with its quads swizzled (`rows_major_step`). A
///   128x64 tile's `a` went from four copies a thread a turn to one.
pub(super) fn copies(mm: &MatMul, plan: &TilePlan, a: bool) -> Copies {
    let k_inner = if a { !mm.a_transposed } else { mm.b_transposed };
    let (side, bound) = if a { (plan.bm, mm.m) } else { (plan.bn, mm.n) };
    let asynchronous = plan.stages > 1 && mm.batch == 1 && QUAD_COPIES.on();
    let whole_quads = (side * plan.bk).is_multiple_of(4 * THREADS as usize);
    if !asynchronous || !whole_quads {
        Copies::Words
    } else if !k_inner && plan.pitch(side).is_multiple_of(4) && bound.is_multiple_of(4) {
        Copies::QuadsAlongSide
    } else if k_inner
        && mm.k.is_multiple_of(4)
        && (plan.split_slabs()
            || (a && !plan.tensor_cores && plan.per_thread().0 == 4 && (plan.bk / plan.groups()).is_multiple_of(4)))
    {
        Copies::QuadsAlongSlab
    } else {
        Copies::Words
    }
}

/// Where step `kk` of row `r` of a slab staged a row after another (`[row][kk]`, rows of `bk`
/// words) lies in its row. Where the block splits the slab for tensor cores (`split_depth`: `bk`,
/// 8, 16 or 32), the row's quads trade places by an XOR of their index with the row's count of
/// 32 banks (`r / (32 / bk)`): the split reads a word of 8 rows (`group`) by 4 steps (`quad`),
/// which rows of 8 words would put two to a bank, of 16 four and of 32 eight, and the XOR moves
/// each row that shares its banks with another to quads of its own, while a quarter warp's
/// 16-byte copies (whole rows, 32 words) still fill 32 banks. A slab whose rows are read as
/// `float4`s stays as it is.
pub(super) fn rows_major_step(r: Expr, kk: Expr, split_depth: Option<usize>) -> Expr {
    match split_depth {
        Some(bk) => bin(BinOp::BitXor, kk, quad_swizzle(r, bk, int)),
        None => kk,
    }
}

/// What `rows_major_step` XORs a split slab's step with in row `r` (`lit` making a constant):
/// `r / (32 / bk) % (bk / 4) * 4`, written with a multiply and a mask, which ptxas takes as a
/// shift and an AND (the division and remainder of a signed row cost two instructions a turn).
/// A row of 32 words or more (a 64-deep slab of a 32x32 tile on tensor cores) starts in bank 0
/// as a 32-deep one does, and is swizzled as one: its quads XOR'd with the row's eighth.
fn quad_swizzle<T>(r: T, bk: usize, lit: impl Fn(i64) -> T) -> T
where
    T: std::ops::Mul<Output = T> + std::ops::BitAnd<Output = T>,
{
    debug_assert!([8, 16, 32, 64].contains(&bk), "a split slab is 8, 16, 32 or 64 deep");
    let bk = bk.min(32);
    let scaled = if bk == 8 { r } else { r * lit((bk / 8) as i64) };
    scaled & lit(bk as i64 - 4)
}

/// Whether an operand's slabs (`a`: the left's) are staged a row of the tile after another
/// (`[row][kk]`, rows of `bk` words: the left operand's read as one `float4` of four steps a
/// thread's row, a split slab's swizzled by `rows_major_step`): where they are copied in quads
/// along the slab. Otherwise its slabs are staged a step after another (`[kk][row]`), a row
/// `pitch` words.
pub(super) fn staged_rows_major(mm: &MatMul, plan: &TilePlan, a: bool) -> bool {
    copies(mm, plan, a) == Copies::QuadsAlongSlab
}

/// Words a copy of the operand's slab moves: 4 where it copies quads, else 1.
fn words_per_copy(mm: &MatMul, plan: &TilePlan, a: bool) -> usize {
    if copies(mm, plan, a) == Copies::Words {
        1
    } else {
        4
    }
}

/// Copies (or loads) of the operand's slab that each thread issues.
fn copies_per_thread(mm: &MatMul, plan: &TilePlan, a: bool) -> usize {
    plan.loads_per_thread(a) / words_per_copy(mm, plan, a)
}

/// The rule by which a thread places its staged words in an operand's slab: word `l` (the thread's
/// index plus `u` times the block's threads for its `u`-th word) lies at `(r, kk)`, along the
/// tile's side and along the slab. One rule written once for both the kernel's expressions and
/// the numbers computed here (`place` is generic over the two).
#[derive(Clone, Copy)]
enum Placement {
    /// Quads along the tile's side (`Copies::QuadsAlongSide`), `per_row` to a step of the slab:
    /// neighbouring threads copy neighbouring quads along the side, a warp 512 bytes.
    QuadsAlongSide { per_row: i64 },
    /// Quads along the slab (`Copies::QuadsAlongSlab`), `per_row` to a row of the tile:
    /// neighbouring threads copy neighbouring quads of a row (a row's slab is 64 or 128 bytes of
    /// the operand), and a warp's 16-byte stores fall in all 32 banks four times over, the rows
    /// `bk` words apart.
    QuadsAlongSlab { per_row: i64 },
    /// An operand contiguous along the slab, whose slabs' rows are padded for `float4` reads: a
    /// warp stages 8 words along the slab (32 bytes, one memory sector) in each of 4 rows, so that
    /// with the slab's pitch 4 past a multiple of 32 its 32 stores fall in 32 different banks (a
    /// warp's 32 words along one row would fall in 8); `runs` runs of 8 make the slab's depth.
    SectorRuns { runs: i64 },
    /// An operand contiguous along the slab: neighbouring threads take neighbouring words of a
    /// row `depth` deep.
    AlongSlab { depth: i64 },
    /// An operand contiguous along the tile's side: neighbouring threads take neighbouring words
    /// of a row `side` long.
    AlongSide { side: i64 },
}

/// The integers a `Placement` computes with: the kernel's expressions, or numbers.
trait PlaceInteger:
    Clone
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Rem<Output = Self>
{
}
impl PlaceInteger for i64 {}
impl PlaceInteger for Expr {}

impl Placement {
    fn of(mm: &MatMul, plan: &TilePlan, a: bool) -> Placement {
        let (bk, side) = (plan.bk as i64, if a { plan.bm } else { plan.bn } as i64);
        // Whether the operand's inner index is its contiguous one (`a` as `[m, k]`, `b` as `[n, k]`).
        let k_inner = if a { !mm.a_transposed } else { mm.b_transposed };
        match copies(mm, plan, a) {
            Copies::QuadsAlongSide => return Placement::QuadsAlongSide { per_row: side / 4 },
            Copies::QuadsAlongSlab => return Placement::QuadsAlongSlab { per_row: bk / 4 },
            Copies::Words => {}
        }
        if k_inner && plan.vectors() {
            debug_assert_eq!(plan.pitch(side as usize) % 32, 4);
            Placement::SectorRuns { runs: bk / 8 }
        } else if k_inner {
            Placement::AlongSlab { depth: bk }
        } else {
            Placement::AlongSide { side }
        }
    }

    /// Where word `l` lies: `(r, kk)`, `lit` making a constant.
    fn place<T: PlaceInteger>(self, l: T, lit: impl Fn(i64) -> T) -> (T, T) {
        match self {
            Placement::QuadsAlongSide { per_row } => (l.clone() % lit(per_row) * lit(4), l / lit(per_row)),
            Placement::QuadsAlongSlab { per_row } => (l.clone() / lit(per_row), l % lit(per_row) * lit(4)),
            Placement::SectorRuns { runs } => {
                let (chunk, lane) = (l.clone() / lit(32), l % lit(32));
                (lane.clone() / lit(8) + chunk.clone() / lit(runs) * lit(4), lane % lit(8) + chunk % lit(runs) * lit(8))
            }
            Placement::AlongSlab { depth } => (l.clone() / lit(depth), l % lit(depth)),
            Placement::AlongSide { side } => (l.clone() % lit(side), l / lit(side)),
        }
    }

    /// How far each thread's `u`-th word lies from its first, `(r, kk)`, where that is the same
    /// for every thread of the block.
    fn step_from_first(self, u: usize) -> Option<(i64, i64)> {
        let at = |l: usize| self.place(l as i64, |v| v);
        let step = |t: usize| {
            let ((r, kk), (r0, kk0)) = (at(t + u * THREADS as usize), at(t));
            (r - r0, kk - kk0)
        };
        let first = step(0);
        (1..THREADS as usize).all(|t| step(t) == first).then_some(first)
    }
}

impl<'a> Emitter<'a> {
    /// Declares where thread `threadIdx.x` stages its `u`-th word (or quad: `copies`) of an
    /// operand's slab (`a`: the left operand): `{a|b}_r{u}` along the tile's side, `{a|b}_kk{u}`
    /// along the slab (`Placement`). A word after the first whose place is the first's moved by
    /// the same step for every thread is declared as that step from the first: then ptxas shares
    /// the words' address arithmetic (from the rule's divisions and remainders it cannot see it),
    /// which took the autoencoder's loops over slabs 6% fewer instructions a turn.
    pub(super) fn staging_places(&self, mm: &MatMul, plan: &TilePlan, a: bool) -> Vec<Stmt> {
        let name = if a { "a" } else { "b" };
        let placement = Placement::of(mm, plan, a);
        let mut out = vec![];
        for u in 0..copies_per_thread(mm, plan, a) {
            let (r, kk) = match placement.step_from_first(u) {
                Some((dr, dkk)) if u > 0 => {
                    let moved = |first: String, by: i64| if by == 0 { var(first) } else { var(first) + int(by) };
                    (moved(format!("{name}_r0"), dr), moved(format!("{name}_kk0"), dkk))
                }
                _ => {
                    let l = cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx)) + int((u * THREADS as usize) as i64);
                    placement.place(l, int)
                }
            };
            out.push(decl(CType::Int, format!("{name}_r{u}"), r));
            out.push(decl(CType::Int, format!("{name}_kk{u}"), kk));
        }
        out
    }

    /// Loads (`declare`: declares) the registers `{a|b}_next{u}` with both operands' words of the
    /// slab starting at inner index `kt`, zero past the matrix or the slice.
    pub(super) fn slab_fetch(&self, mm: &MatMul, plan: &TilePlan, it: CType, kt: Expr, declare: bool) -> Vec<Stmt> {
        let mut out = vec![];
        for w in slab_words(mm, plan, it, kt, Checks::Every) {
            let word = index(var(w.operand), w.at);
            let value = match w.inside {
                Some(inside) => select(inside, word, Expr::F32(0.0)),
                None => word,
            };
            let reg = format!("{}_next{}", w.side, w.u);
            out.push(if declare { decl_mut(CType::Float, reg, value) } else { assign(var(reg), value) });
        }
        out
    }

    /// Issues the asynchronous copies of both operands' words of the slab starting at inner index
    /// `kt` into slab buffer `stage` (zeros past the matrix or, where `slab_may_end_early`, the
    /// slice); statements for a scope of their own (they declare each word's flag).
    pub(super) fn slab_copy(
        &self,
        mm: &MatMul,
        plan: &TilePlan,
        it: CType,
        kt: Expr,
        stage: Expr,
        slab_may_end_early: bool,
    ) -> Vec<Stmt> {
        let mut out = vec![];
        for w in slab_words(mm, plan, it, kt, Checks::Passable { slab_may_end_early }) {
            let (side, u) = (w.side, w.u);
            let pitch = plan.pitch(if side == "a" { plan.bm } else { plan.bn }) as i64;
            // Nothing is copied where the word is outside (its address is clamped inside).
            let inside = match w.inside {
                Some(inside) => {
                    let flag = format!("{side}_in{u}");
                    out.push(decl(CType::Bool, &flag, inside));
                    var(&flag)
                }
                None => Expr::Bool(true),
            };
            let src = var(w.operand) + w.at;
            let (r, kk) = (var(format!("{side}_r{u}")), var(format!("{side}_kk{u}")));
            // A buffer is `bk` steps of `pitch` words, whichever way its slab is staged (a tile's
            // `side` rows of `bk` words take less).
            let (outer, inner, stride) = if w.copies == Copies::QuadsAlongSlab {
                (r.clone(), rows_major_step(r, kk, plan.split_slabs().then_some(plan.bk)), plan.bk as i64)
            } else {
                (kk, r, pitch)
            };
            let within = stage.clone() * int(plan.bk as i64 * pitch) + outer * int(stride) + inner;
            let helper = if w.copies == Copies::Words { COPY_HELPER } else { QUAD_COPY_HELPER };
            out.push(Stmt::Call(call(helper, vec![var(format!("tile_{side}")) + within, src, inside])));
        }
        out
    }
}

/// Whether every slab of every slice is whole: the inner dimension is a multiple of the slab's
/// depth (a slice is whole slabs, so only the last slab of the last slice can be cut short).
pub(super) fn slabs_whole(mm: &MatMul, plan: &TilePlan) -> bool {
    mm.k.is_multiple_of(plan.bk)
}

/// One word of a slab that a thread stages: its operand (`a` or `b`) and number, where it is in
/// the operand, and whether it lies inside the matrix and the slice (`None`: it always does).
struct SlabWord {
    side: &'static str,
    operand: &'static str,
    u: usize,
    at: Expr,
    inside: Option<Expr>,
    /// How the word is copied (the first of four adjacent words, where it is a quad).
    copies: Copies,
}

/// Which bounds a slab's words are checked against.
#[derive(Clone, Copy)]
enum Checks {
    /// Both, each word: loads into registers (`slab_fetch`), whose loads ptxas leaves where they
    /// are issued (before the barrier) when predicated, where on compute capability 7.5 it sank
    /// unpredicated ones after the multiply-adds (`tiles_load_before_they_multiply_…`).
    Every,
    /// Only those a word can pass (below); the slice's end only where `slab_may_end_early` (the
    /// caller may know this slab whole).
    Passable { slab_may_end_early: bool },
}

/// The words of the slab starting at inner index `kt` that each thread stages, `a`'s then `b`'s,
/// each checked as `checks` says.
///
/// A bound that no word can pass is not checked: ptxas cannot leave the check out itself, since
/// the tile's first row and the slice come from the block's index. A tile's rows (its columns)
/// stay inside a side of the product that is a multiple of the tile's; and every slab is whole
/// where `slabs_whole` says so. The checks and the selects they guard took about 15 of the 16
/// instructions that each staged word cost a turn of the autoencoder's first layer (64x64 tiles
/// of a 128x784x1000 product: 131 integer instructions beside 256 multiply-adds and 35 shared
/// loads a turn).
fn slab_words(mm: &MatMul, plan: &TilePlan, it: CType, kt: Expr, checks: Checks) -> Vec<SlabWord> {
    let mut out = vec![];
    let (every, slab_may_end_early) = match checks {
        Checks::Every => (true, true),
        Checks::Passable { slab_may_end_early } => (false, slab_may_end_early),
    };
    let k_always_inside = !every && (!slab_may_end_early || slabs_whole(mm, plan));
    for a in [true, false] {
        let (first, bound) = if a { ("row0", mm.m as i64) } else { ("col0", mm.n as i64) };
        let tile_side = if a { plan.bm } else { plan.bn };
        let rows_always_inside = !every && (bound as usize).is_multiple_of(tile_side);
        let k_inner = if a { !mm.a_transposed } else { mm.b_transposed };
        let (side, operand) = if a { ("a", "mm_a") } else { ("b", "mm_b") };
        let copies = copies(mm, plan, a);
        for u in 0..copies_per_thread(mm, plan, a) {
            let rg = var(first) + cast(it, var(format!("{side}_r{u}")));
            let kg = kt.clone() + cast(it, var(format!("{side}_kk{u}")));
            let row_inside = (!rows_always_inside).then(|| bin(BinOp::Lt, rg.clone(), int(bound)));
            let k_inside = (!k_always_inside).then(|| bin(BinOp::Lt, kg.clone(), var("k_hi")));
            // A word that may lie outside reads (or copies nothing from) its index clamped to the
            // last inside, so that its address stays in the operand: the row's clamp is the same
            // every turn (ptxas computes it once), where a select of the whole offset cost two
            // selects a word every turn.
            let clamp = |index: Expr, inside: &Option<Expr>, last: Expr| match inside {
                Some(inside) if !every => select(inside.clone(), index, last),
                _ => index,
            };
            // (A quad's last start inside: the side, or the inner dimension and so the slice's
            // end, is a multiple of four.)
            let quad_along = |along: Copies| if copies == along { 4 } else { 1 };
            let rg = clamp(rg, &row_inside, int(bound - quad_along(Copies::QuadsAlongSide)));
            let kg = clamp(kg, &k_inside, var("k_hi") - int(quad_along(Copies::QuadsAlongSlab)));
            let at = if k_inner { rg * int(mm.k as i64) + kg } else { kg * int(bound) + rg };
            let inside = row_inside.into_iter().chain(k_inside).reduce(|x, y| bin(BinOp::And, x, y));
            out.push(SlabWord { side, operand, u, at, inside, copies });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::quad_swizzle;

    /// The bank of step `kk` of row `r` of a split slab staged a row after another.
    fn bank(r: i64, kk: i64, bk: usize) -> i64 {
        (r * bk as i64 + (kk ^ quad_swizzle(r, bk, |v| v))) % 32
    }

    #[test]
    fn split_slabs_staged_a_row_after_another_are_read_and_copied_in_32_banks() {
        for bk in [8usize, 16, 32, 64] {
            // The split: a warp reads one word of its lanes' fragments, rows `group` (from a band's
            // first row, a multiple of 8, plus 0 or 8) by steps `quad` (plus 0 or 4, in any step of
            // 8 of the slab).
            for (band, row, step, kk) in [(0, 0, 0, 0), (8, 8, 0, 4), (16, 0, 1, 4), (120, 8, 1, 0)] {
                let step = step % (bk as i64 / 8);
                let mut banks: Vec<i64> =
                    (0..32).map(|lane| bank(band + row + lane / 4, step * 8 + kk + lane % 4, bk)).collect();
                banks.sort();
                banks.dedup();
                assert_eq!(banks.len(), 32, "{bk}-deep slab, band {band} + {row}, step {step}, kk {kk}");
            }
            // The copies: a quarter warp's eight 16-byte quads, whole rows in order.
            let per_row = bk as i64 / 4;
            for first in [0, 8, 64] {
                let mut banks: Vec<i64> = (first..first + 8)
                    .flat_map(|l| (0..4).map(move |w| (l / per_row, l % per_row * 4 + w)))
                    .map(|(r, kk)| bank(r, kk, bk))
                    .collect();
                banks.sort();
                banks.dedup();
                assert_eq!(banks.len(), 32, "{bk}-deep slab, copies from thread {first}");
            }
        }
    }
}
