//! Float products of medium size computed by kiln's own tiled kernel, with their epilogue in the
//! same kernel: one launch instead of a cuBLAS call and an epilogue kernel. At the batch sizes of a
//! training step (a 128x784x256 layer) a product is a few microseconds of arithmetic, and what a
//! step pays is per launch; cuBLAS stays for the large products, where its kernels' speed matters.
//!
//! Each block computes a tile of the result from slabs of both operands staged in shared memory
//! (the next slab loaded into registers while the current one is used, or, where the card has
//! asynchronous copies, by default three and at most eight slabs copied into buffers of their
//! own, the tile's outputs then staged in those buffers where they fit there; `tile_staging.rs`),
//! each of its 256 threads a few outputs in registers: 128x64 or 64x64 tiles with 8x4 or 4x4 outputs a
//! thread, read from shared memory as `float4`s (four multiply-adds per word read; eight rows as
//! two runs of four, half the tile apart, so that a quarter warp's reads hit 32 banks; a left
//! operand copied in quads along the slab is staged a row of the tile after another, a thread's
//! four rows read as a `float4` of four steps each: `tile_staging::staged_rows_major`); 32x32 tiles
//! with four groups of 64 threads, each group computing the whole tile (4x4 outputs a thread, as
//! `float4`s) over a quarter of each slab's depth, the groups' partial tiles added in group order
//! (`T32x32K4`; `T32x32`, 2x2 outputs a thread 16 apart, read a word for every multiply-add).
//! The shape is the largest that the output fills and that gives the card enough blocks
//! (`TilePlan::for_product`, `tile_plan.rs`; 128x128 tiles only when asked, to measure them). When
//! tiles are too few to fill the card, the inner dimension is cut into slices, a block per (tile,
//! slice): each block writes its partial tile to scratch memory, and the last block of a tile to
//! finish (a ticket counter) adds the slices in slice order, so the result does not depend on
//! timing (`tile_finish.rs`); on cards with thread block clusters (the default there) a tile's
//! slices are one cluster and add their partial tiles through distributed shared memory, in the
//! same order (`cluster.rs`). The block that holds a tile's final values then runs the epilogue
//! group on it, an element per thread in row-major order (coalesced), with the product's value
//! where the epilogue would have read it from memory. With tensor cores asked for
//! (`KILN_CUDA_TF32X3=1`, or `TileChoice::tensor_cores`), the same tiles are computed by warp
//! multiply-adds at float32 accuracy (3xTF32, `mma.rs`); opt-in until measured on a card. Where
//! a tile table (`tile_table.rs`) lists a product, its measured choice replaces these estimates.

use super::ast::*;
use super::emit::{Emitter, ProductInEpilogue, MAX_GRID, THREADS};
use super::mma;
use super::tile_staging;
use crate::kernel::{LoopKernel, MatMul};
use kiln_ir::DType;

use super::tile_plan::lane_offset;
pub(super) use super::tile_plan::TilePlan;
use super::tile_shape::choice;
pub use super::tile_shape::{with_tile_choice, TileChoice, TileShape};

/// Products of at most this many multiply-adds are tiled (when they have an epilogue to take in);
/// larger ones go to cuBLAS, whose kernels are faster once the arithmetic dominates.
/// `KILN_CUDA_TILED_MACS` sets another bound, to measure where that is on a card.
const TILED_MACS: usize = 1 << 27;

fn tiled_macs() -> usize {
    static MACS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::bound_from_env(&MACS, "KILN_CUDA_TILED_MACS", TILED_MACS)
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
pub(super) fn walks_in_order(v: &crate::kernel::View, shape: &[usize]) -> bool {
    let mut expected = 1;
    for d in (0..shape.len()).rev() {
        if shape[d] > 1 && v.strides[d] != expected {
            return false;
        }
        expected *= shape[d] as isize;
    }
    v.offset == 0
}

/// Whether the loop over a slice's slabs takes its turns in passes, a pass as many turns as bring
/// every buffer index back where it started (`turns_a_pass`), so that in each turn the indices are
/// constants: the buffers' addresses then fold into the loads' and stores' offsets rather than
/// being computed each turn. `KILN_CUDA_TURN_PASSES=1` or `0` says for every tile; otherwise only
/// tiles on tensor cores take them. In fmnist-mlp-4k's 128x64 tensor-core tile a turn of 48
/// multiply-adds took 194 instructions in a pass of six, 235 in a loop of single turns (before
/// the split's `cvt.rn.tf32.f32`, `mma.rs`; `cuda_source --loads`, which counts a pass); the FMA
/// tiles' turns 3 to 14% fewer, but their passes are up to three times a loop's code (28 KB for a
/// 128x64 tile), which may cost more in instruction fetches than it saves: opt-in there until
/// timed on a card.
pub(super) static TURN_PASSES: super::Switch = super::Switch::new("KILN_CUDA_TURN_PASSES", false);

/// Runs `f` with every CUDA program this thread specializes taking the slab loop's turns in passes
/// (`on`), or one at a time, for every tile, whatever `KILN_CUDA_TURN_PASSES` says.
pub fn with_turn_passes<R>(on: bool, f: impl FnOnce() -> R) -> R {
    TURN_PASSES.with(on, f)
}

/// At most this many turns a pass: eight buffers' passes would be eight turns of code (a slice of
/// fewer slabs is still one pass).
const MOST_TURNS_A_PASS: usize = 6;

/// Turns a pass of `plan`'s slab loop (`TURN_PASSES`): as many as its slab buffers (twice as many
/// with an odd number of them where slabs are split a turn ahead, into two split buffers), or a
/// slice's slabs where they are fewer (one pass then takes the whole slice); `None` where its
/// turns are taken one at a time.
fn turns_a_pass(plan: &TilePlan) -> Option<usize> {
    let turns = if plan.split_ahead && plan.stages % 2 == 1 { 2 * plan.stages } else { plan.stages };
    let pass = turns.min(plan.slabs);
    let on = TURN_PASSES.set().unwrap_or(plan.tensor_cores);
    (on && plan.stages > 1 && pass <= MOST_TURNS_A_PASS).then_some(pass)
}

/// Name of the register holding a thread's output `(i, j)`.
pub(super) fn acc(i: usize, j: usize) -> String {
    format!("acc_{i}_{j}")
}

/// The multiply-adds of one slab, read from the slab buffers `slabs` (`a`'s, `b`'s; on tensor
/// cores with copied slabs, from the split arrays the slab was split into): every step
/// along its depth, or, where groups of threads split it, the group's run of steps; four steps a
/// turn where `a`'s slab is staged a row after another (`a_rows_major`). A loop of constant trip
/// count, which NVRTC unrolls whole on its own for a shape's own slab depth, but a slab twice as
/// deep (`TilePlan::deepened`) it left two or four steps a turn (a 128x64 tile's 16 steps of 32
/// multiply-adds, a 32x32 tile's group's 16 steps of 16), and in a pass of turns (`turns_a_pass`)
/// a 32x32 tile's steps, so there `#pragma unroll` asks for it (only there: the pragma changed
/// ptxas's schedule of other tiles, some for worse).
fn slab_multiply(plan: &TilePlan, slabs: (&str, &str), a_rows_major: bool) -> Vec<Stmt> {
    let unroll = plan.deepened() || turns_a_pass(plan).is_some();
    let unrolled = |var: &str, end: i64, step: i64, body: Vec<Stmt>| unrolled_loop(var, end, step, body, unroll);
    if plan.tensor_cores {
        let products = if plan.split_slabs() {
            mma::split_slab_step((plan.bm, plan.bn, plan.bk), plan.split_ahead.then(|| var("sp")), acc)
        } else {
            mma::slab_step(plan.bm, plan.bn, (plan.pitch(plan.bm), plan.pitch(plan.bn)), slabs, acc)
        };
        return unrolled("kk", plan.bk as i64, mma::MMA_K as i64, products);
    }
    let (mut products, steps) =
        if a_rows_major { (rows_major_products(plan, slabs), 4) } else { (slab_products(plan, slabs), 1) };
    if plan.groups() > 1 {
        let depth = (plan.bk / plan.groups()) as i64;
        products.insert(0, decl(CType::Int, "kk", var("grp") * int(depth) + var("kq")));
        unrolled("kq", depth, steps, products)
    } else {
        unrolled("kk", plan.bk as i64, steps, products)
    }
}

/// Four steps `kk..kk + 4` through the staged slabs where `a`'s is staged a row of the tile after
/// another (`tile_staging::staged_rows_major`): each of the thread's four rows of `a` read as one
/// `float4` of the four steps (a quarter warp's eight threads share their rows: one read for
/// all), then at each step its columns of `b` as before, and the multiply-adds. As many reads of
/// shared memory as four single steps.
fn rows_major_products(plan: &TilePlan, (slab_a, slab_b): (&str, &str)) -> Vec<Stmt> {
    let (tm, tn) = plan.per_thread();
    debug_assert!(tm == 4 && plan.vectors(), "a thread's rows of a row-major slab are one float4");
    let (bk, pitch_b) = (plan.bk as i64, plan.pitch(plan.bn) as i64);
    let mut step = vec![];
    let rows = var(slab_a) + var("kk");
    for i in 0..tm {
        let at = plan.out_row(i) * int(bk / 4);
        step.push(decl(CType::Float4, format!("a{i}"), Expr::Vec4(Box::new(rows.clone()), Box::new(at))));
    }
    for s in 0..4 {
        let base = var(slab_b) + (var("kk") + int(s)) * int(pitch_b);
        for q in 0..tn / 4 {
            step.push(decl(CType::Float4, format!("b{q}_{s}"), thread_float4(plan, base.clone(), "tx", q)));
        }
        for i in 0..tm {
            for j in 0..tn {
                let a = Expr::Lane(Box::new(var(format!("a{i}"))), s as u8);
                let b = Expr::Lane(Box::new(var(format!("b{}_{s}", j / 4))), (j % 4) as u8);
                step.push(assign(var(acc(i, j)), var(acc(i, j)) + a * b));
            }
        }
    }
    step
}

/// The thread's `q`-th `float4` of rows (`along` = `ty`) or columns (`tx`) in the staged step that
/// starts at `base`: a thread's runs of four are `side` float4s apart.
fn thread_float4(plan: &TilePlan, base: Expr, along: &str, q: usize) -> Expr {
    let at = var(along) * int(1) + int((q * plan.side()) as i64);
    Expr::Vec4(Box::new(base), Box::new(at))
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
                step.push(decl(CType::Float4, format!("{name}{q}"), thread_float4(plan, base.clone(), along, q)));
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
        // Rows of four floats are copied 16 bytes at a time where the layout allows (`copies`).
        let align = if plan.vectors() || plan.split_slabs() { 16 } else { 0 };
        let tid = || cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx));
        // Tensor cores take each operand element as its TF32 high and low parts, split once a
        // block: through registers, kept side by side in the one slab buffer (one 8-byte access
        // reads both); copied, the buffers hold the words as copied (`mma::split_arrays`).
        self.scalars.tensor_cores |= plan.tensor_cores;
        let slab_type = if plan.tensor_cores && !plan.split_slabs() { CType::UInt2 } else { ft };
        let mut body = vec![
            Stmt::SharedArray { ty: slab_type, name: "tile_a".into(), len: plan.stages * bk * pitch_a, align },
            Stmt::SharedArray { ty: slab_type, name: "tile_b".into(), len: plan.stages * bk * pitch_b, align },
        ];
        if plan.split_slabs() {
            body.extend(mma::split_arrays(bm, bn, bk, plan.split_buffers()));
        }
        let mut setup = if plan.tensor_cores {
            mma::places(plan.bm, plan.bn)
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
        slab.extend(slab_multiply(plan, ("tile_a", "tile_b"), false));
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
    /// but the newest `stages - 2` groups is a wait for this turn's slab. Split a turn ahead
    /// (`TilePlan::split_ahead`), a turn waits for the next slab, refills its own slab's buffer
    /// (split the turn before), multiplies its slab from one split buffer and splits the next
    /// into the other: the barrier that lets the copies' words be read also orders each split
    /// buffer's writes after the multiply-adds that read it a turn before, and before those that
    /// read it a turn after.
    fn slabs_by_copies(&mut self, mm: &MatMul, plan: &TilePlan, it: CType) -> Vec<Stmt> {
        let (bk, stages) = (plan.bk as i64, plan.stages);
        // (Split ahead, the first slab is waited for with one more group in flight: the prelude's
        // waits are counted as if for a buffer more.)
        let waits_for = stages + usize::from(plan.split_ahead);
        self.scalars.async_copies = self.scalars.async_copies.max(waits_for);
        // Split a turn ahead (`TilePlan::split_ahead`), a turn's slab was split the turn before,
        // so its buffer is free to refill once past the turn's barrier: the loop starts with
        // every buffer's slab in flight (one more than otherwise) and the first slab split.
        let in_flight = if plan.split_ahead { stages } else { stages - 1 };
        let mut out = vec![];
        for s in 0..in_flight {
            let kt = var("k_lo") + int(s as i64 * bk);
            let copies = self.slab_copy(mm, plan, it, kt.clone(), int(s as i64), true);
            out.push(Stmt::If(bin(BinOp::Lt, kt, var("k_hi")), copies, vec![]));
            out.push(tile_staging::commit());
        }
        let ahead = var("kt") + int(in_flight as i64 * bk);
        // The buffer a turn multiplies, counted round rather than computed from `kt` (a division
        // and a remainder by the stages each turn), and the one it refills: the buffer of the turn
        // before, which every thread is done with once past this turn's barrier (split ahead, the
        // turn's own).
        let last = int(stages as i64 - 1);
        let st_is = |v: Expr| bin(BinOp::Eq, var("st"), v);
        let refill = if plan.split_ahead { var("st") } else { select(st_is(int(0)), last.clone(), var("st") - int(1)) };
        let next = select(st_is(last), int(0), var("st") + int(1));
        let slab_at = |tile: &str, side: usize, buffer: Expr| var(tile) + buffer * int(bk * plan.pitch(side) as i64);
        let slabs_at = |buffer: Expr| {
            vec![
                decl_mut(CType::ConstFloatPtr, "slab_a", slab_at("tile_a", plan.bm, buffer.clone())),
                decl_mut(CType::ConstFloatPtr, "slab_b", slab_at("tile_b", plan.bn, buffer)),
            ]
        };
        let layout = |a: bool, side: usize| match tile_staging::staged_rows_major(mm, plan, a) {
            true => mma::SlabLayout::Rows,
            false => mma::SlabLayout::Steps { pitch: plan.pitch(side) },
        };
        let layouts = (layout(true, plan.bm), layout(false, plan.bn));
        let split = |into: Option<Expr>| mma::split_slab((plan.bm, plan.bn, plan.bk), layouts, into);
        if plan.split_ahead {
            // The first slab, once every thread's copies of it are in, into split buffer 0.
            let mut first = slabs_at(int(0));
            first.extend(split(Some(int(0))));
            out.extend([tile_staging::wait(stages - 1), Stmt::SyncThreads]);
            out.push(Stmt::If(bin(BinOp::Lt, var("k_lo"), var("k_hi")), first, vec![]));
        }
        let passes = turns_a_pass(plan);
        if passes.is_none() {
            if plan.split_ahead {
                out.push(decl_mut(CType::Int, "sp", int(0)));
            }
            out.push(decl_mut(CType::Int, "st", int(0)));
        }
        // Only a slice's last slab may end before the slab's depth (`slabs_whole`): the slabs
        // before it are copied without a check of the slice's end.
        let copy_ahead = |checked: bool| self.slab_copy(mm, plan, it, ahead.clone(), refill.clone(), checked);
        let if_ahead_in_slice =
            |copies: Vec<Stmt>| Stmt::If(bin(BinOp::Lt, ahead.clone(), var("k_hi")), copies, vec![]);
        let refill_copies = if tile_staging::slabs_whole(mm, plan) {
            if_ahead_in_slice(copy_ahead(false))
        } else {
            let whole = bin(BinOp::Le, ahead.clone() + int(bk), var("k_hi"));
            Stmt::If(whole, copy_ahead(false), vec![if_ahead_in_slice(copy_ahead(true))])
        };
        let mut turn = vec![tile_staging::wait(stages - 2), Stmt::SyncThreads, refill_copies, tile_staging::commit()];
        let rows_major = tile_staging::staged_rows_major(mm, plan, true);
        if plan.split_ahead {
            // This turn's multiply-adds, then the next slab split into the other buffer: the
            // split's loads and arithmetic issue while the tensor cores work through the
            // multiply-adds, which the split does not wait for.
            turn.extend(slab_multiply(plan, ("slab_a", "slab_b"), rows_major));
            let mut split_next = slabs_at(next.clone());
            split_next.extend(split(Some(int(1) - var("sp"))));
            turn.push(Stmt::If(bin(BinOp::Lt, var("kt") + int(bk), var("k_hi")), split_next, vec![]));
        } else {
            turn.extend(slabs_at(var("st")));
            if plan.split_slabs() {
                turn.extend(split(None));
            }
            turn.extend(slab_multiply(plan, ("slab_a", "slab_b"), rows_major));
        }
        let slab_loop = match passes {
            None => {
                if plan.split_ahead {
                    turn.push(assign(var("sp"), int(1) - var("sp")));
                }
                turn.push(assign(var("st"), next));
                Stmt::For { ty: it, var: "kt".into(), init: var("k_lo"), end: var("k_hi"), step: int(bk), body: turn }
            }
            // A pass of `turns` turns, after which every buffer index is back where it started (or
            // which takes the whole slice): each turn a block of its own in which the indices are
            // constants (and `kt` its slab), the turns past the slice's end left by `break`.
            Some(turns) => {
                let mut pass = vec![];
                for t in 0..turns as i64 {
                    if t > 0 {
                        let past_slice = bin(BinOp::Ge, var("kt_pass") + int(t * bk), var("k_hi"));
                        pass.push(Stmt::If(past_slice, vec![Stmt::Break], vec![]));
                    }
                    let mut block = vec![
                        decl(it, "kt", var("kt_pass") + int(t * bk)),
                        decl(CType::Int, "st", int(t % stages as i64)),
                    ];
                    if plan.split_ahead {
                        block.push(decl(CType::Int, "sp", int(t % 2)));
                    }
                    block.extend(turn.iter().cloned());
                    pass.push(Stmt::Block(block));
                }
                let step = int(turns as i64 * bk);
                out.push(Stmt::Comment(format!(
                    "The slabs' turns in passes of {turns}, each turn's buffer indices constants."
                )));
                Stmt::For { ty: it, var: "kt_pass".into(), init: var("k_lo"), end: var("k_hi"), step, body: pass }
            }
        };
        out.push(slab_loop);
        // The groups left are empty (nothing copied past the slice): no copy outlives the loop.
        out.push(tile_staging::wait(0));
        out
    }
}
