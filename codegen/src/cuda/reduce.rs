//! Reduction kernels: the accumulator (f64 for float sums and products, i64 for integer ones, the
//! element type for max/min/argmax, as the CPU backend), and the three shapes of work: one thread
//! per output for short rows, one block per row (warp shuffles, then shared memory across warps)
//! when rows are contiguous, and a 32x8 tile per 32 outputs when the kept dim is contiguous
//! (column sums such as bias gradients), so adjacent threads read adjacent addresses; a thread's
//! walk of at most 16 elements of a row is unrolled, so its loads go out together. Argmax keeps
//! the first maximum and lets a NaN win, combining (value, index) pairs in any order.

use super::ast::*;
use super::emit::{decompose, grid_for, grid_stride_loop, launch_1d, offset, Emitter, MAX_GRID, THREADS};
use super::scalar::literal;
use super::single::SINGLE_BLOCK_THREADS;
use crate::kernel::{elem_size, LoopKernel};
use kiln_ir::ops::{BinaryOp, ReduceOp};
use kiln_ir::DType;

/// The accumulator dtype of a reduction whose elements have dtype `d` (as the CPU backend's).
fn acc_dtype(op: ReduceOp, d: DType) -> DType {
    match op {
        ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax => d,
        _ if d.is_float() => DType::F64,
        _ => DType::I64,
    }
}

fn lowest(d: DType) -> Expr {
    match d {
        DType::F32 => Expr::F32(f32::NEG_INFINITY),
        DType::F64 => Expr::F64(f64::NEG_INFINITY),
        DType::I32 => int(i32::MIN as i64),
        _ => int(i64::MIN),
    }
}

fn highest(d: DType) -> Expr {
    match d {
        DType::F32 => Expr::F32(f32::INFINITY),
        DType::F64 => Expr::F64(f64::INFINITY),
        DType::I32 => int(i32::MAX as i64),
        _ => int(i64::MAX),
    }
}

/// Where a reduction kernel's work goes.
#[derive(Clone, Copy, PartialEq, Debug)]
enum ReduceShape {
    /// One thread per output, looping over its row.
    Thread,
    /// One block per output row, warp shuffles then shared memory.
    Block(u32),
    /// 32 outputs per block (adjacent threads, adjacent outputs), 8 rows of threads over the row.
    Tile,
    /// The tile, with each row cut into this many slices, one block each: for few outputs and long
    /// rows (a bias gradient at batch 4096), which would otherwise keep a handful of SMs busy. Each
    /// block writes its partial results to scratch memory; the last block of a tile to finish (a
    /// ticket counter) combines them in slice order, so the result does not depend on timing.
    SplitTile(usize),
    /// A block per slice of each row, for a few long rows (a loss's mean over a whole batch of
    /// images), which one block per row would walk alone: partial results in scratch memory,
    /// combined in slice order by the last block of the row to finish.
    SplitBlock(usize),
}

/// After a block wrote its slice's results: makes them visible to every block, takes the block's
/// ticket for `key` (one thread, `first_thread`) and sets `last_block[0]` in the block that took the
/// last of `slices` tickets.
pub(super) fn take_ticket(counters: &str, key: Expr, first_thread: Expr, slices: usize) -> Vec<Stmt> {
    let ticket = call("atomicAdd", vec![var(counters) + key, Expr::ULong(1)]);
    vec![
        Stmt::Call(call("__threadfence", vec![])),
        Stmt::SyncThreads,
        Stmt::If(
            first_thread,
            vec![assign(index(var("last_block"), int(0)), bin(BinOp::Eq, ticket, Expr::ULong(slices as u64 - 1)))],
            vec![],
        ),
        Stmt::SyncThreads,
    ]
}

/// A reduction's kept dims, its number of rows (outputs) and the length of each row.
fn row_dims(k: &LoopKernel) -> (usize, usize, usize) {
    let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
    (kept, k.shape[..kept].iter().product(), k.shape[kept..].iter().product())
}

/// `for (r = 0; r < row_len; r++) body`: a thread's walk over its row.
fn row_loop(it: CType, row_len: usize, body: Vec<Stmt>) -> Stmt {
    Stmt::For { ty: it, var: "r".into(), init: int(0), end: int(row_len as i64), step: int(1), body }
}

/// Elements of a row that one block of a split row reduces (16 per thread).
const SLICE_ELEMENTS: usize = 4096;

/// The most turns of a thread's walk over its share of a row that are unrolled (`fold_loop`): a
/// split row's 16 a thread. Past it the loop is kept: unrolled, fmnist-mlp-4k's bias gradients
/// (32 checked turns a thread) kept only 6 loads in flight, where the loop's main part, unrolled
/// by ptxas, issued 16 at a time.
const UNROLLED_TURNS: usize = 16;

/// How many turns each thread's walk over its share of a row takes, as far as the kernel's shape
/// tells.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Turns {
    /// Every thread takes this many.
    Exactly(usize),
    /// None takes more than this many.
    AtMost(usize),
    /// Not known when the kernel is emitted.
    Unknown,
}

impl Turns {
    /// The turns of walks from thread offsets `0..step` to `end` by `step`.
    fn of(end: usize, step: usize) -> Turns {
        if end.is_multiple_of(step) {
            Turns::Exactly(end / step)
        } else {
            Turns::AtMost(end.div_ceil(step))
        }
    }
}

impl<'a> Emitter<'a> {
    fn reduce_shape(&self, k: &LoopKernel, kept: usize, rows: usize, row_len: usize) -> ReduceShape {
        if row_len <= 16 {
            return ReduceShape::Thread;
        }
        if self.single_block {
            return ReduceShape::Block(SINGLE_BLOCK_THREADS);
        }
        let last = k.shape.len() - 1;
        let contiguous_row = k.inputs.iter().any(|v| v.strides[last].abs() == 1);
        let contiguous_kept = kept > 0 && k.inputs.iter().any(|v| v.strides[kept - 1].abs() == 1);
        let splittable = k.reduce.is_some_and(|r| r.0 != ReduceOp::ArgMax);
        if splittable && (contiguous_row || !contiguous_kept) && rows <= 32 && row_len >= 2 * SLICE_ELEMENTS {
            return ReduceShape::SplitBlock(row_len.div_ceil(SLICE_ELEMENTS).min(256 / rows.max(1)).max(2));
        }
        if !contiguous_row && contiguous_kept && rows >= 32 {
            let tiles = rows.div_ceil(32);
            let slices = row_len.div_ceil(256).min((256 / tiles).max(1));
            if tiles < 64 && row_len >= 1024 && slices > 1 && k.reduce.is_some_and(|r| r.0 != ReduceOp::ArgMax) {
                ReduceShape::SplitTile(slices)
            } else {
                ReduceShape::Tile
            }
        } else {
            // Always a full block, even for short rows: a block of the common size can run side by
            // side with its neighbours (`side`), which saves more than its idle threads cost.
            ReduceShape::Block(THREADS)
        }
    }

    /// The multi-index of output row `o`, a fresh accumulator, and the loop folding this thread's
    /// share of the row into it (elements `first`, `first + step`, ...; `turns` of them).
    #[allow(clippy::too_many_arguments)]
    fn row_accumulation(
        &mut self,
        k: &LoopKernel,
        dtypes: &[DType],
        op: ReduceOp,
        it: CType,
        first: Expr,
        step: usize,
        turns: Turns,
    ) -> Vec<Stmt> {
        let reduced = k.reduce.map_or(0, |r| r.1);
        let kept = k.shape.len() - reduced;
        let row_len: usize = k.shape[kept..].iter().product();
        let d = *dtypes.last().expect("non-empty");
        let mut per_row = vec![];
        decompose(var("o"), &k.shape[..kept], 0, it, &mut per_row);
        self.init_acc(op, d, &mut per_row);
        per_row.extend(self.fold_loop(k, dtypes, op, it, first, int(row_len as i64), step, turns));
        per_row
    }

    /// `for (r = first; r < end; r += step)`: the reduced multi-index of `r`, then the element folded
    /// into `acc`. Where a thread takes at most `UNROLLED_TURNS` turns (`turns`), the walk is
    /// unrolled whole, each turn's `r` counted from `first` (and checked against `end` unless every
    /// thread takes them all): ptxas then issues 6 to 16 of a thread's loads before its first add.
    /// Of a loop of unknown count it made a remainder loop of up to 3 turns, a load and a round
    /// trip to memory each, then parts unrolled by 16, 8 and 4, whose loads it issued 16 ahead of
    /// the adds in most kernels, but 2 or 3 ahead in the autoencoder's bias gradient beside its
    /// loss, and with no part by 16 at all (4 a round trip) in fmnist-mlp-4k's loss's mean.
    #[allow(clippy::too_many_arguments)]
    fn fold_loop(
        &mut self,
        k: &LoopKernel,
        dtypes: &[DType],
        op: ReduceOp,
        it: CType,
        first: Expr,
        end: Expr,
        step: usize,
        turns: Turns,
    ) -> Vec<Stmt> {
        let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
        let mut per_elem = vec![];
        decompose(var("r"), &k.shape[kept..], kept, it, &mut per_elem);
        self.fold_element(k, dtypes, op, cast(CType::LongLong, var("r")), &mut per_elem);
        let (most, all) = match turns {
            Turns::Exactly(n) => (n, true),
            Turns::AtMost(n) => (n, false),
            Turns::Unknown => (usize::MAX, false),
        };
        if most > UNROLLED_TURNS {
            return vec![Stmt::For {
                ty: it,
                var: "r".into(),
                init: first,
                end,
                step: int(step as i64),
                body: per_elem,
            }];
        }
        // `r` of turn `turn` (`None`: the first).
        let at =
            |turn: Option<Expr>| decl(it, "r", turn.map_or(first.clone(), |t| first.clone() + t * int(step as i64)));
        let per_turn = |turn: Option<Expr>| {
            if all {
                [vec![at(turn)], per_elem.clone()].concat()
            } else {
                vec![at(turn), Stmt::If(bin(BinOp::Lt, var("r"), end.clone()), per_elem.clone(), vec![])]
            }
        };
        if most == 1 {
            // In a block of its own, as the loop's `r` is in the loop's.
            return vec![Stmt::Block(per_turn(None))];
        }
        unrolled_loop("turn", most as i64, 1, per_turn(Some(var("turn"))), true)
    }

    /// Statements that fold the element at the current multi-index into `acc` (and `best`).
    fn fold_element(&mut self, k: &LoopKernel, dtypes: &[DType], op: ReduceOp, row_index: Expr, out: &mut Vec<Stmt>) {
        let dims = k.shape.len();
        let ins = self.member_inputs(0, dims, "", out);
        let d = *dtypes.last().expect("non-empty");
        let v = self.exprs(k, dtypes, &ins, "", out);
        self.combine(op, d, v, row_index, out);
    }

    /// `acc (+)= v` for the reduction; `idx` is v's position in the row (for argmax).
    fn combine(&mut self, op: ReduceOp, d: DType, v: Expr, idx: Expr, out: &mut Vec<Stmt>) {
        let ad = acc_dtype(op, d);
        let acc = var("acc");
        let widened = if ad == d { v.clone() } else { cast(CType::of(ad), v.clone()) };
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                let s = self.scalars.binary(BinaryOp::Add, ad, acc.clone(), widened);
                out.push(assign(acc, s))
            }
            ReduceOp::Prod => {
                let s = self.scalars.binary(BinaryOp::Mul, ad, acc.clone(), widened);
                out.push(assign(acc, s))
            }
            ReduceOp::Max => {
                let m = self.scalars.max(d, acc.clone(), v);
                out.push(assign(acc, m))
            }
            ReduceOp::Min => {
                let m = self.scalars.min(d, acc.clone(), v);
                out.push(assign(acc, m))
            }
            ReduceOp::ArgMax => {
                let take = self.scalars.argmax_take(d, acc.clone(), var("best"), v.clone(), idx.clone());
                out.push(Stmt::If(take, vec![assign(acc, v), assign(var("best"), idx)], vec![]))
            }
        }
    }

    fn init_acc(&self, op: ReduceOp, d: DType, out: &mut Vec<Stmt>) {
        let ad = acc_dtype(op, d);
        let init = match op {
            ReduceOp::Sum | ReduceOp::Mean => literal(ad, 0.0),
            ReduceOp::Prod => literal(ad, 1.0),
            ReduceOp::Max | ReduceOp::ArgMax => lowest(ad),
            ReduceOp::Min => highest(ad),
        };
        out.push(decl_mut(CType::of(ad), "acc", init));
        if op == ReduceOp::ArgMax {
            out.push(decl_mut(CType::LongLong, "best", int(i64::MAX)));
        }
    }

    /// The value of a finished row of `row_len` elements (from `acc`, `best`), and its dtype.
    fn row_value(op: ReduceOp, d: DType, row_len: usize) -> (Expr, DType) {
        match op {
            // An empty row (or, never, an unset best) gives index 0.
            ReduceOp::ArgMax => (select(bin(BinOp::Eq, var("best"), int(i64::MAX)), int(0), var("best")), DType::I64),
            ReduceOp::Mean => (cast(CType::Double, var("acc")) / Expr::F64(row_len as f64), DType::F64),
            _ => (var("acc"), acc_dtype(op, d)),
        }
    }

    /// Stores a finished row of `row_len` elements, then runs the group's followers at its index.
    fn finish(&mut self, k: &LoopKernel, op: ReduceOp, d: DType, row_len: usize, at: Expr) -> Stmt {
        let (value, dtype) = Self::row_value(op, d, row_len);
        let mut out = vec![];
        let y = self.member_value(0, value, dtype, "", &mut out);
        out.push(assign(index(var("out"), at), y));
        let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
        self.followers_element(kept, &mut out);
        Stmt::Block(out)
    }

    pub(super) fn reduction(&mut self, k: &LoopKernel, dtypes: &[DType], op: ReduceOp) -> (Vec<Stmt>, Launch) {
        let it = self.index_type(k);
        let (kept, rows, row_len) = row_dims(k);
        let d = *dtypes.last().expect("non-empty");
        let ad = acc_dtype(op, d);
        let out_at = offset(&k.out, kept);
        match self.reduce_shape(k, kept, rows, row_len) {
            ReduceShape::Thread => {
                // A short row, walked by a loop of known count (which NVRTC unrolls).
                let mut per_row = self.row_accumulation(k, dtypes, op, it, int(0), 1, Turns::Unknown);
                per_row.push(self.finish(k, op, d, row_len, out_at));
                let body = vec![grid_stride_loop(it, "o", rows, per_row)];
                (body, launch_1d(rows))
            }
            ReduceShape::Block(threads) => {
                let warps = (threads / 32) as usize;
                let mut body =
                    vec![Stmt::SharedArray { ty: CType::of(ad), name: "partial".into(), len: warps, align: 0 }];
                if op == ReduceOp::ArgMax {
                    body.push(Stmt::SharedArray {
                        ty: CType::LongLong,
                        name: "partial_best".into(),
                        len: warps,
                        align: 0,
                    });
                }
                body.push(decl(
                    CType::Int,
                    "lane",
                    bin(BinOp::BitAnd, cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx)), int(31)),
                ));
                body.push(decl(CType::Int, "warp", cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx)) / int(32)));
                let mut per_row = self.row_accumulation(
                    k,
                    dtypes,
                    op,
                    it,
                    cast(it, Expr::Builtin(Builtin::ThreadIdx)),
                    threads as usize,
                    Turns::of(row_len, threads as usize),
                );
                self.warp_reduce(op, d, 32, &mut per_row);
                let mut publish = vec![assign(index(var("partial"), var("warp")), var("acc"))];
                if op == ReduceOp::ArgMax {
                    publish.push(assign(index(var("partial_best"), var("warp")), var("best")));
                }
                per_row.push(Stmt::If(bin(BinOp::Eq, var("lane"), int(0)), publish, vec![]));
                per_row.push(Stmt::SyncThreads);
                let mut last = vec![];
                if warps > 1 {
                    let init = match op {
                        ReduceOp::Sum | ReduceOp::Mean => literal(ad, 0.0),
                        ReduceOp::Prod => literal(ad, 1.0),
                        ReduceOp::Max | ReduceOp::ArgMax => lowest(ad),
                        ReduceOp::Min => highest(ad),
                    };
                    let has = bin(BinOp::Lt, var("lane"), int(warps as i64));
                    last.push(assign(var("acc"), select(has.clone(), index(var("partial"), var("lane")), init)));
                    if op == ReduceOp::ArgMax {
                        let b = select(has, index(var("partial_best"), var("lane")), int(i64::MAX));
                        last.push(assign(var("best"), b));
                    }
                    self.warp_reduce(op, d, warps, &mut last);
                }
                let store = self.finish(k, op, d, row_len, out_at);
                last.push(Stmt::If(bin(BinOp::Eq, var("lane"), int(0)), vec![store], vec![]));
                per_row.push(Stmt::If(bin(BinOp::Eq, var("warp"), int(0)), last, vec![]));
                // The next row reuses `partial`.
                per_row.push(Stmt::SyncThreads);
                body.push(Stmt::For {
                    ty: it,
                    var: "o".into(),
                    init: cast(it, Expr::Builtin(Builtin::BlockIdx)),
                    end: int(rows as i64),
                    step: cast(it, Expr::Builtin(Builtin::GridDim)),
                    body: per_row,
                });
                (body, Launch { grid: (rows.min(MAX_GRID) as u32, 1), block: (threads, 1), cluster: 1 })
            }
            ReduceShape::SplitTile(slices) => self.split_tile(k, dtypes, op, it, slices),
            ReduceShape::SplitBlock(slices) => self.split_block(k, dtypes, op, it, slices),
            ReduceShape::Tile => {
                let mut body =
                    vec![Stmt::SharedArray { ty: CType::of(ad), name: "partial".into(), len: 256, align: 0 }];
                if op == ReduceOp::ArgMax {
                    body.push(Stmt::SharedArray {
                        ty: CType::LongLong,
                        name: "partial_best".into(),
                        len: 256,
                        align: 0,
                    });
                }
                let (tx, ty) = (
                    cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx)),
                    cast(CType::Int, Expr::Builtin(Builtin::ThreadIdxY)),
                );
                body.push(decl(CType::Int, "tx", tx));
                body.push(decl(CType::Int, "ty", ty));
                let mut per_tile = vec![decl(it, "o", var("base") + cast(it, var("tx")))];
                decompose(var("o"), &k.shape[..kept], 0, it, &mut per_tile);
                self.init_acc(op, d, &mut per_tile);
                let turns = Turns::of(row_len, 8);
                let walk = self.fold_loop(k, dtypes, op, it, cast(it, var("ty")), int(row_len as i64), 8, turns);
                let in_range = bin(BinOp::Lt, var("o"), int(rows as i64));
                per_tile.push(Stmt::If(in_range.clone(), walk, vec![]));
                let slot = var("ty") * int(32) + var("tx");
                let mut publish = vec![assign(index(var("partial"), slot.clone()), var("acc"))];
                if op == ReduceOp::ArgMax {
                    publish.push(assign(index(var("partial_best"), slot), var("best")));
                }
                per_tile.extend(publish);
                per_tile.push(Stmt::SyncThreads);
                let mut gather = vec![];
                let other = index(var("partial"), var("y") * int(32) + var("tx"));
                let other_best = index(var("partial_best"), var("y") * int(32) + var("tx"));
                self.combine_partial(op, d, other, other_best, &mut gather);
                let mut first_row = vec![Stmt::For {
                    ty: CType::Int,
                    var: "y".into(),
                    init: int(1),
                    end: int(8),
                    step: int(1),
                    body: gather,
                }];
                first_row.push(self.finish(k, op, d, row_len, out_at));
                per_tile.push(Stmt::If(
                    bin(BinOp::And, bin(BinOp::Eq, var("ty"), int(0)), in_range),
                    first_row,
                    vec![],
                ));
                per_tile.push(Stmt::SyncThreads);
                body.push(Stmt::For {
                    ty: it,
                    var: "base".into(),
                    init: cast(it, Expr::Builtin(Builtin::BlockIdx)) * int(32),
                    end: int(rows as i64),
                    step: cast(it, Expr::Builtin(Builtin::GridDim)) * int(32),
                    body: per_tile,
                });
                (body, Launch { grid: (grid_for(rows, 32), 1), block: (32, 8), cluster: 1 })
            }
        }
    }

    /// `ReduceShape::SplitTile`: block (tile, slice) reduces rows `[slice * chunk, ...)` of 32
    /// outputs, writes them to `scratch[slice][output]`, and the last block of the tile combines
    /// the slices in order, stores the outputs and runs the followers.
    fn split_tile(
        &mut self,
        k: &LoopKernel,
        dtypes: &[DType],
        op: ReduceOp,
        it: CType,
        slices: usize,
    ) -> (Vec<Stmt>, Launch) {
        let (kept, rows, row_len) = row_dims(k);
        let (tiles, chunk) = (rows.div_ceil(32), row_len.div_ceil(slices));
        let d = *dtypes.last().expect("non-empty");
        let ad = acc_dtype(op, d);
        let scratch = self.scratch_param(CType::of(ad), "scratch", slices * rows * elem_size(ad) as usize);
        let counters = self.scratch_param(CType::UInt, "tickets", tiles * 4);
        let mut body = vec![
            Stmt::SharedArray { ty: CType::of(ad), name: "partial".into(), len: 256, align: 0 },
            Stmt::SharedArray { ty: CType::Bool, name: "last_block".into(), len: 1, align: 0 },
            decl(CType::Int, "tx", cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx))),
            decl(CType::Int, "ty", cast(CType::Int, Expr::Builtin(Builtin::ThreadIdxY))),
            decl(it, "tile", cast(it, Expr::Builtin(Builtin::BlockIdx))),
            decl(it, "slice", cast(it, Expr::Builtin(Builtin::BlockIdxY))),
            decl(it, "o", var("tile") * int(32) + cast(it, var("tx"))),
        ];
        decompose(var("o"), &k.shape[..kept], 0, it, &mut body);
        self.init_acc(op, d, &mut body);
        body.push(decl(it, "lo", var("slice") * int(chunk as i64)));
        let hi = var("lo") + int(chunk as i64);
        body.push(decl(it, "hi", select(bin(BinOp::Lt, hi.clone(), int(row_len as i64)), hi, int(row_len as i64))));
        let turns = Turns::AtMost(chunk.div_ceil(8));
        let walk = self.fold_loop(k, dtypes, op, it, var("lo") + cast(it, var("ty")), var("hi"), 8, turns);
        let in_range = bin(BinOp::Lt, var("o"), int(rows as i64));
        body.push(Stmt::If(in_range.clone(), walk, vec![]));
        body.push(assign(index(var("partial"), var("ty") * int(32) + var("tx")), var("acc")));
        body.push(Stmt::SyncThreads);
        let mut gather = vec![];
        self.combine_partial(op, d, index(var("partial"), var("y") * int(32) + var("tx")), int(0), &mut gather);
        let first_row = vec![
            Stmt::For { ty: CType::Int, var: "y".into(), init: int(1), end: int(8), step: int(1), body: gather },
            assign(index(var(&scratch), var("slice") * int(rows as i64) + var("o")), var("acc")),
        ];
        body.push(Stmt::If(bin(BinOp::And, bin(BinOp::Eq, var("ty"), int(0)), in_range.clone()), first_row, vec![]));
        let first_thread = bin(BinOp::And, bin(BinOp::Eq, var("tx"), int(0)), bin(BinOp::Eq, var("ty"), int(0)));
        body.extend(take_ticket(&counters, var("tile"), first_thread.clone(), slices));
        let combine = self.combine_slices(k, op, it, &scratch, slices);
        let last = vec![
            Stmt::If(bin(BinOp::And, bin(BinOp::Eq, var("ty"), int(0)), in_range), combine, vec![]),
            // Ready for the next launch (a replayed graph runs the same kernel again).
            Stmt::If(first_thread, vec![assign(index(var(&counters), var("tile")), Expr::ULong(0))], vec![]),
        ];
        body.push(Stmt::If(index(var("last_block"), int(0)), last, vec![]));
        (body, Launch { grid: (tiles as u32, slices as u32), block: (32, 8), cluster: 1 })
    }

    /// `ReduceShape::SplitBlock`: block (row, slice) reduces elements `[slice * chunk, ...)` of its
    /// row (warp shuffles, then the warps' results), writes the result to `scratch[slice][row]`,
    /// and the last block of the row combines the slices in order, stores it and runs the followers.
    fn split_block(
        &mut self,
        k: &LoopKernel,
        dtypes: &[DType],
        op: ReduceOp,
        it: CType,
        slices: usize,
    ) -> (Vec<Stmt>, Launch) {
        let (kept, rows, row_len) = row_dims(k);
        let chunk = row_len.div_ceil(slices);
        let (threads, warps) = (THREADS as usize, THREADS as usize / 32);
        let d = *dtypes.last().expect("non-empty");
        let ad = acc_dtype(op, d);
        let scratch = self.scratch_param(CType::of(ad), "scratch", slices * rows * elem_size(ad) as usize);
        let counters = self.scratch_param(CType::UInt, "tickets", rows * 4);
        let tid = || cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx));
        let mut body = vec![
            Stmt::SharedArray { ty: CType::of(ad), name: "partial".into(), len: warps, align: 0 },
            Stmt::SharedArray { ty: CType::Bool, name: "last_block".into(), len: 1, align: 0 },
            decl(CType::Int, "lane", bin(BinOp::BitAnd, tid(), int(31))),
            decl(CType::Int, "warp", tid() / int(32)),
            decl(it, "o", cast(it, Expr::Builtin(Builtin::BlockIdx))),
            decl(it, "slice", cast(it, Expr::Builtin(Builtin::BlockIdxY))),
        ];
        decompose(var("o"), &k.shape[..kept], 0, it, &mut body);
        self.init_acc(op, d, &mut body);
        body.push(decl(it, "lo", var("slice") * int(chunk as i64)));
        let hi = var("lo") + int(chunk as i64);
        body.push(decl(it, "hi", select(bin(BinOp::Lt, hi.clone(), int(row_len as i64)), hi, int(row_len as i64))));
        let turns = Turns::AtMost(chunk.div_ceil(threads));
        body.extend(self.fold_loop(k, dtypes, op, it, var("lo") + cast(it, tid()), var("hi"), threads, turns));
        self.warp_reduce(op, d, 32, &mut body);
        let lane0 = bin(BinOp::Eq, var("lane"), int(0));
        body.push(Stmt::If(lane0.clone(), vec![assign(index(var("partial"), var("warp")), var("acc"))], vec![]));
        body.push(Stmt::SyncThreads);
        let mut first_warp = vec![];
        let mut identity = vec![];
        self.init_acc_assign(op, d, &mut identity);
        let Some(Stmt::Assign(_, identity)) = identity.into_iter().next() else { unreachable!("acc is reset") };
        let has = bin(BinOp::Lt, var("lane"), int(warps as i64));
        first_warp.push(assign(var("acc"), select(has, index(var("partial"), var("lane")), identity)));
        self.warp_reduce(op, d, warps, &mut first_warp);
        let slot = index(var(&scratch), var("slice") * int(rows as i64) + var("o"));
        first_warp.push(Stmt::If(lane0, vec![assign(slot, var("acc"))], vec![]));
        body.push(Stmt::If(bin(BinOp::Eq, var("warp"), int(0)), first_warp, vec![]));
        let first_thread = bin(BinOp::Eq, tid(), int(0));
        body.extend(take_ticket(&counters, var("o"), first_thread.clone(), slices));
        let mut combine = self.combine_slices(k, op, it, &scratch, slices);
        // Ready for the next launch (a replayed graph runs the same kernel again).
        combine.push(assign(index(var(&counters), var("o")), Expr::ULong(0)));
        let last = bin(BinOp::And, index(var("last_block"), int(0)), first_thread);
        body.push(Stmt::If(last, combine, vec![]));
        (body, Launch { grid: (rows as u32, slices as u32), block: (THREADS, 1), cluster: 1 })
    }

    /// In the last block to finish: `acc` folded over the slices' results in `scratch` (in slice
    /// order, so the result does not depend on timing) for output `o`, stored, followers run.
    fn combine_slices(&mut self, k: &LoopKernel, op: ReduceOp, it: CType, scratch: &str, slices: usize) -> Vec<Stmt> {
        let d = *self.group[0].dtypes.last().expect("non-empty");
        let (kept, rows, row_len) = row_dims(k);
        let mut combine = vec![];
        self.init_acc_assign(op, d, &mut combine);
        let mut per_slice = vec![];
        // `__ldcg` reads through L2, where the other blocks' results are.
        let other = call("__ldcg", vec![var(scratch) + (var("s") * int(rows as i64) + var("o"))]);
        self.combine_partial(op, d, other, int(0), &mut per_slice);
        combine.push(Stmt::For {
            ty: it,
            var: "s".into(),
            init: int(0),
            end: int(slices as i64),
            step: int(1),
            body: per_slice,
        });
        combine.push(self.finish(k, op, d, row_len, offset(&k.out, kept)));
        combine
    }

    /// Follower `m`, a reduction over the same short rows as the group's first member, for the row
    /// this thread just finished: its own accumulator (shadowing the first's in a nested block), its
    /// inputs read at the row's elements or, for earlier members' results, from their registers;
    /// its result declared outside the block as `y{m}` for the members after it.
    pub(super) fn follower_reduction(&mut self, m: usize, out: &mut Vec<Stmt>) {
        let k = self.group[m].kernel.clone();
        let dtypes = self.group[m].dtypes.clone();
        let (op, reduced) = k.reduce.expect("a reduction follower");
        let kept = k.shape.len() - reduced;
        let row_len: usize = k.shape[kept..].iter().product();
        let d = *dtypes.last().expect("non-empty");
        let it = self.index_type(&k);
        let y = format!("y{m}");
        out.push(Stmt::Decl { ty: CType::of(k.out_dtype), name: y.clone(), init: None, constant: false });
        let mut block = vec![];
        self.init_acc(op, d, &mut block);
        let mut per_elem = vec![];
        decompose(var("r"), &k.shape[kept..], kept, it, &mut per_elem);
        let ins = self.member_inputs(m, k.shape.len(), "", &mut per_elem);
        let v = self.exprs(&k, &dtypes, &ins, &format!("_f{m}"), &mut per_elem);
        self.combine(op, d, v, cast(CType::LongLong, var("r")), &mut per_elem);
        block.push(row_loop(it, row_len, per_elem));
        let (value, dtype) = Self::row_value(op, d, row_len);
        block.push(assign(var(&y), self.scalars.unary(kiln_ir::ops::UnaryOp::Cast(k.out_dtype), dtype, value)));
        block.push(assign(index(var(format!("f{m}_out")), offset(&k.out, kept)), var(&y)));
        out.push(Stmt::Block(block));
    }

    /// Follower `m`, an elementwise kernel over every element of the row this thread just
    /// finished (`kept` kept dims): a loop over the row, each element stored (later members read
    /// it back from memory: this thread wrote it).
    pub(super) fn follower_row_elements(&mut self, m: usize, kept: usize, out: &mut Vec<Stmt>) {
        let k = self.group[m].kernel.clone();
        let row_len: usize = k.shape[kept..].iter().product();
        let it = self.index_type(&k);
        let mut per_elem = vec![];
        decompose(var("r"), &k.shape[kept..], kept, it, &mut per_elem);
        self.member_element(m, k.shape.len(), &mut per_elem);
        out.push(row_loop(it, row_len, per_elem));
    }

    /// Resets `acc` to the reduction's identity.
    fn init_acc_assign(&self, op: ReduceOp, d: DType, out: &mut Vec<Stmt>) {
        let mut decls = vec![];
        self.init_acc(op, d, &mut decls);
        for s in decls {
            if let Stmt::Decl { name, init: Some(e), .. } = s {
                out.push(assign(var(name), e));
            }
        }
    }

    /// Folds another partial result (`other`, and `other_best` for argmax) into `acc`.
    fn combine_partial(&mut self, op: ReduceOp, d: DType, other: Expr, other_best: Expr, out: &mut Vec<Stmt>) {
        let ad = acc_dtype(op, d);
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                let s = self.scalars.binary(BinaryOp::Add, ad, var("acc"), other);
                out.push(assign(var("acc"), s))
            }
            ReduceOp::Prod => {
                let s = self.scalars.binary(BinaryOp::Mul, ad, var("acc"), other);
                out.push(assign(var("acc"), s))
            }
            ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax => {
                if op == ReduceOp::ArgMax {
                    out.push(decl(CType::of(ad), "other", other));
                    out.push(decl(CType::LongLong, "other_best", other_best));
                    let take = self.scalars.argmax_take(d, var("acc"), var("best"), var("other"), var("other_best"));
                    out.push(Stmt::If(
                        take,
                        vec![assign(var("acc"), var("other")), assign(var("best"), var("other_best"))],
                        vec![],
                    ));
                } else {
                    let m = if op == ReduceOp::Max {
                        self.scalars.max(d, var("acc"), other)
                    } else {
                        self.scalars.min(d, var("acc"), other)
                    };
                    out.push(assign(var("acc"), m));
                }
            }
        }
    }

    /// Tree reduction of `acc` across the first `width` lanes of each warp, by shuffles; lane 0
    /// ends with the result.
    fn warp_reduce(&mut self, op: ReduceOp, d: DType, width: usize, out: &mut Vec<Stmt>) {
        let mut offset = width.next_power_of_two() / 2;
        while offset > 0 {
            let shfl = |v: &str| call("__shfl_down_sync", vec![Expr::ULong(0xffff_ffff), var(v), int(offset as i64)]);
            let mut step = vec![];
            self.combine_partial(op, d, shfl("acc"), shfl("best"), &mut step);
            out.push(Stmt::Block(step));
            offset /= 2;
        }
    }
}
