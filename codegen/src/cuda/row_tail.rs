//! Short-row reductions at the end of the tiled product whose rows they reduce: a classifier's
//! logits (`x w + b`, a tile as wide as every class) followed by the softmax cross-entropy's row
//! pass (row maximum, sum of exponentials, loss, softmax and its gradient, one thread per row) run
//! as one kernel, the block that finished a band of the product's rows then reducing those rows,
//! instead of a kernel of their own that waits for the whole product. A step's chain of kernels is
//! one launch shorter (fmnist-mlp's seven become six, its loss's mean then sits beside the next
//! layer's gradient).
//!
//! It is safe where (`fits`): the tile spans every column (`tiles_n == 1`), so a block's finished
//! rows are whole rows; the reduction's group runs a thread per row (`group::THREAD_ROWS`) over
//! exactly the product's rows; everything it reads that the product's kernel writes is an output
//! the epilogue walked in row-major order, read only within the thread's own row (stride `n`
//! between rows, every other index inside the row); and it writes nothing the product's kernel
//! reads or writes, which other blocks may still be doing. The block reaches its rows after a
//! barrier, past which its own threads' stores are visible to it. Each row is still reduced by
//! one thread in the same order, so results are bit for bit those of the separate kernel.
//! `KILN_CUDA_ROW_TAIL=0` keeps the separate kernel (to time what joining saves on a card).

use super::ast::*;
use super::emit::{DeviceStep, Emitter, KernelArg, Launchable, THREADS};
use super::group::{Location, THREAD_ROWS};
use super::side::accesses;
use super::single::rewrite_stmts;
use super::tiled::TilePlan;
use crate::kernel::{BufId, LoopKernel, MatMul, View};
use std::collections::HashMap;

/// Whether the environment turns the joining off (`KILN_CUDA_ROW_TAIL=0`).
fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_from_env(&OFF, "KILN_CUDA_ROW_TAIL", "0")
}

/// A tiled product's kernel just emitted, which the next group may join as its tail.
#[derive(Clone, Debug)]
pub(super) struct TiledKernel {
    pub(super) name: String,
    pub(super) mm: MatMul,
    pub(super) plan: TilePlan,
    /// The buffers its epilogue group writes in row-major order over the product's `m x n`
    /// elements (element `(row, col)` at `row * n + col`).
    pub(super) row_major_outputs: Vec<BufId>,
}

impl TiledKernel {
    pub(super) fn new(name: &str, mm: &MatMul, plan: TilePlan, epilogue: &[&LoopKernel]) -> TiledKernel {
        let row_major_outputs = epilogue
            .iter()
            .filter(|k| {
                k.reduce.is_none()
                    && k.shape.iter().product::<usize>() == mm.m * mm.n
                    && super::tiled::walks_in_order(&k.out, &k.shape)
            })
            .map(|k| k.out.buf)
            .collect();
        TiledKernel { name: name.into(), mm: mm.clone(), plan, row_major_outputs }
    }
}

/// Whether view `v` of a kernel over `shape` (its first dim the rows) reads, at row `o`, only
/// elements `o * n .. (o + 1) * n` of its buffer.
fn within_own_row(v: &View, shape: &[usize], n: usize) -> bool {
    if v.strides.len() != shape.len() || shape.is_empty() || v.strides[0] != n as isize {
        return false;
    }
    let (mut lo, mut hi) = (v.offset, v.offset);
    for (&s, &len) in v.strides[1..].iter().zip(&shape[1..]) {
        let reach = s * (len as isize - 1);
        if reach < 0 {
            lo += reach
        } else {
            hi += reach
        }
    }
    lo >= 0 && hi < n as isize
}

/// Whether the group `tail` (a reduction and its followers, in program order right after the
/// product) can run at the end of `tiled`'s kernel (`kernel`, launched with `args`); see the
/// module's comment for the conditions.
pub(super) fn fits(
    loc: &[Location],
    tiled: &TiledKernel,
    kernel: &Kernel,
    args: &[KernelArg],
    tail: &[&LoopKernel],
) -> bool {
    let (m, n) = (tiled.mm.m, tiled.mm.n);
    let reduction = tail[0];
    let Some((_, reduced)) = reduction.reduce else { return false };
    let kept = reduction.shape.len() - reduced;
    let row_len: usize = reduction.shape[kept..].iter().product();
    if disabled()
        || tiled.plan.tiles_n != 1
        || tiled.plan.bm > THREADS as usize
        || kept != 1
        || reduction.shape[0] != m
        || row_len > THREAD_ROWS
    {
        return false;
    }
    let (reads, writes) = accesses(kernel, args, loc);
    tail.iter().all(|k| {
        let rows_ok = k.shape.first() == Some(&m);
        let inputs_ok = k.inputs.iter().all(|v| {
            !writes.contains(&loc[v.buf])
                || (tiled.row_major_outputs.contains(&v.buf) && within_own_row(v, &k.shape, n))
        });
        let out = loc[k.out.buf];
        rows_ok && inputs_ok && !reads.contains(&out) && !writes.contains(&out)
    })
}

/// The rows of the product that a block of `plan`'s kernel holds finished at the end of its
/// body, as `(guard, first, end)`: the block runs the tail on rows `first..end` where `guard`
/// (block-uniform) holds. A whole tile's block holds its tile's rows, a sliced tile's last block
/// too (`last_block`), a cluster's block its share of them (as `tile_finish` shares them out).
/// `end` may read `tail_first`, the declared `first`.
fn finished_rows(plan: &TilePlan, m: usize, it: CType) -> (Option<Expr>, Expr, Expr) {
    let clip = |end: Expr, bound: Expr| select(bin(BinOp::Lt, end.clone(), bound.clone()), end, bound);
    let row0 = var("row0");
    let tile_end = row0.clone() + int(plan.bm as i64);
    // Clipped to the product only where a tile can reach past it.
    let tile_end = if m.is_multiple_of(plan.bm) { tile_end } else { clip(tile_end, int(m as i64)) };
    if plan.slices > 1 && plan.cluster {
        let per = plan.bm.div_ceil(plan.slices);
        let share_end = var("tail_first") + int(per as i64);
        // Unclipped only where the shares cut the tile exactly and tiles the product.
        let exact = per * plan.slices == plan.bm && m.is_multiple_of(plan.bm);
        let end = if exact { share_end } else { clip(share_end, tile_end) };
        return (None, row0 + cast(it, var("slice")) * int(per as i64), end);
    }
    let guard = (plan.slices > 1).then(|| index(var("last_block"), int(0)));
    (guard, row0, tile_end)
}

/// The index type and per-row statements of a thread-per-row kernel: its body one grid-stride
/// loop over `o` that reads no block index or size, its arguments all buffers; `None` for any
/// other kernel.
fn per_row_body(tail: &Kernel, args: &[KernelArg]) -> Option<(CType, Vec<Stmt>)> {
    let [Stmt::For { ty, var: o, body, .. }] = &tail.body[..] else { return None };
    let buffers_only = args.iter().all(|a| matches!(a, KernelArg::Buf(_)));
    (o == "o" && buffers_only && !mentions_block_builtins(body)).then(|| (*ty, body.clone()))
}

/// Appends the reduction group's thread-per-row kernel `tail` (launched with `tail_args`;
/// `per_row_body` gives its rows' statements) to the end of `tiled`'s kernel `kernel` (launched
/// by `launch`): its parameters renamed `tail_...`, its threads each taking a row the block
/// finished. Memory the two parts share, one of them writing it, loses `__restrict__` on both
/// sides.
fn attach(
    loc: &[Location],
    tiled: &TiledKernel,
    kernel: &mut Kernel,
    launch: &mut Launchable,
    tail: Kernel,
    tail_args: Vec<KernelArg>,
) {
    let (it, mut per_row) = per_row_body(&tail, &tail_args).expect("checked by attach_row_tail");
    let names: HashMap<String, String> =
        tail.params.iter().map(|p| (p.name.clone(), format!("tail_{}", p.name))).collect();
    rewrite_stmts(&mut per_row, &names, &|_| None);
    let (guard, first, end) = finished_rows(&tiled.plan, tiled.mm.m, it);
    let rows = vec![
        // The block's stores of its rows are visible to all its threads past the barrier.
        Stmt::SyncThreads,
        decl(it, "tail_first", first),
        decl(it, "tail_end", end),
        // A tile has at most as many rows as the block has threads: a row a thread, no loop.
        decl(it, "o", var("tail_first") + cast(it, Expr::Builtin(Builtin::ThreadIdx))),
        Stmt::If(bin(BinOp::Lt, var("o"), var("tail_end")), per_row, vec![]),
    ];
    kernel.body.push(Stmt::Comment(format!("{}: on the rows this block finished", tail.name)));
    kernel.body.push(match guard {
        Some(g) => Stmt::If(g, rows, vec![]),
        None => Stmt::Block(rows),
    });
    kernel.comments.push(format!("{} then runs {} on the rows each block finished:", kernel.name, tail.name));
    kernel.comments.extend(tail.comments.iter().map(|c| format!("  {c}")));
    let (tail_reads, tail_writes) = accesses(&tail, &tail_args, loc);
    let (own_reads, own_writes) = accesses(kernel, &launch.args, loc);
    let shared_with = |l: Location, reads: &[Location], writes: &[Location], writing: bool| {
        writes.contains(&l) || (writing && reads.contains(&l))
    };
    for (p, a) in kernel.params.iter_mut().zip(&launch.args) {
        if let KernelArg::Buf(b) = a {
            let writing = matches!(p.kind, ParamKind::Out | ParamKind::InOut);
            if shared_with(loc[*b], &tail_reads, &tail_writes, writing) {
                p.kind = unrestricted(&p.kind);
            }
        }
    }
    for (p, a) in tail.params.iter().zip(&tail_args) {
        let KernelArg::Buf(b) = a else { unreachable!("a thread-per-row kernel takes buffers only") };
        let writing = matches!(p.kind, ParamKind::Out | ParamKind::InOut);
        let kind =
            if shared_with(loc[*b], &own_reads, &own_writes, writing) { unrestricted(&p.kind) } else { p.kind.clone() };
        kernel.params.push(Param { name: names[&p.name].clone(), kind, ..p.clone() });
        launch.args.push(*a);
    }
}

impl Emitter<'_> {
    /// Whether the group `tail` can join `target`, the kernel emitted last (see `fits`).
    pub(super) fn tail_fits(&self, target: &TiledKernel, tail: &[&LoopKernel]) -> bool {
        match (self.kernels.last(), self.steps.last()) {
            (Some(k), Some(DeviceStep::Launch(l))) if k.name == target.name && l.kernel == target.name => {
                fits(&self.loc, target, k, &l.args, tail)
            }
            _ => false,
        }
    }

    /// Moves the kernel emitted last (the tail's) into `target`'s, emitted just before it;
    /// false where it stays a kernel of its own (its body not a thread per row).
    pub(super) fn attach_row_tail(&mut self, target: &TiledKernel) -> bool {
        let thread_per_row = match (self.kernels.last(), self.steps.last()) {
            (Some(k), Some(DeviceStep::Launch(l))) => per_row_body(k, &l.args).is_some(),
            _ => false,
        };
        if !thread_per_row {
            return false;
        }
        let (Some(tail), Some(DeviceStep::Launch(tail_launch))) = (self.kernels.pop(), self.steps.pop()) else {
            unreachable!("checked above")
        };
        let (Some(kernel), Some(DeviceStep::Launch(launch))) = (self.kernels.last_mut(), self.steps.last_mut()) else {
            unreachable!("checked by tail_fits")
        };
        attach(&self.loc, target, kernel, launch, tail, tail_launch.args);
        true
    }
}

/// A parameter's kind without `__restrict__`.
fn unrestricted(kind: &ParamKind) -> ParamKind {
    match kind {
        ParamKind::In | ParamKind::InAliased => ParamKind::InAliased,
        ParamKind::Out | ParamKind::InOut => ParamKind::InOut,
        ParamKind::Value => ParamKind::Value,
    }
}

/// Whether statements read the block's index, size or the grid's size (which a tail's loop,
/// running inside another kernel's blocks, may not).
fn mentions_block_builtins(body: &[Stmt]) -> bool {
    let seen = std::cell::Cell::new(false);
    let mut copy = body.to_vec();
    rewrite_stmts(&mut copy, &HashMap::new(), &|b| {
        if !matches!(b, Builtin::ThreadIdx) {
            seen.set(true);
        }
        None
    });
    seen.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_reads_only_its_own_row() {
        let v = |offset, strides: Vec<isize>| View { buf: 0, offset, strides };
        // [128, 10] read as rows of 10
        assert!(within_own_row(&v(0, vec![10, 1]), &[128, 10], 10));
        // one column of each row, and the row read backwards
        assert!(within_own_row(&v(3, vec![10, 0]), &[128, 10], 10));
        assert!(within_own_row(&v(9, vec![10, -1]), &[128, 10], 10));
        assert!(within_own_row(&v(9, vec![10]), &[128], 10));
        // past the row's end, before its start, another row's stride, a column walk
        assert!(!within_own_row(&v(1, vec![10, 1]), &[128, 10], 10));
        assert!(!within_own_row(&v(0, vec![10, -1]), &[128, 10], 10));
        assert!(!within_own_row(&v(0, vec![20, 1]), &[128, 10], 10));
        assert!(!within_own_row(&v(0, vec![1, 128]), &[128, 10], 10));
        assert!(!within_own_row(&v(10, vec![10]), &[128], 10));
    }
}
