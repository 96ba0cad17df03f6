//! Groups over a tiled product's rows at the end of its kernel (its *tail*): the block that
//! finished a band of the product's rows goes on to run later groups on those rows, instead of
//! each group being a kernel of its own that waits for the whole product. A classifier's logits
//! (`h w + b`, a tile as wide as every class) are followed by the softmax cross-entropy's row
//! pass (row maximum, sum of exponentials, loss, softmax and gradient, a thread per row), then by
//! the gradient's product with the layer's weights (ten multiply-adds an element) and the
//! previous layer's relu mask: fmnist-mlp's chain of kernels is one shorter for each.
//!
//! A stage is a group of loop kernels in one of two walks: a thread-per-row reduction with its
//! followers (`group::THREAD_ROWS`), or an elementwise group over the rows' elements, possibly
//! computing a short product where it reads it (`special::product_in_epilogue`, a dot product of
//! at most `DOT_DEPTH` an element). It joins (`Emitter::tail_stage`) where the tile spans every
//! column (`tiles_n == 1`), so a block's finished rows are whole rows; the group runs over
//! exactly the product's rows; everything it reads that the kernel writes (the epilogue's
//! outputs, earlier stages') is laid out by rows and read only within the element's own row, the
//! product's left operand included; it writes nothing the kernel reads or writes, which other
//! blocks may still be doing; and its threads do no more work than a thread of its own kernel
//! would (at most `DOT_DEPTH` multiply-adds or elements: a tail runs on the tiled kernel's
//! blocks alone, at batch 4096 the gradient's product would be 320 a thread). A stage may move
//! ahead of up to `MAX_PASSED` steps emitted since the tiled kernel (the loss's mean, which only
//! the caller reads) that touch nothing it touches, one of them writing it. Each stage starts
//! with a barrier, past which the block's stores are visible to its threads. Each row is still
//! computed by the same arithmetic in the same order, so results are bit for bit those of the
//! separate kernels. `KILN_CUDA_ROW_TAIL=0` (`with_row_tails(false, ..)` for one thread) keeps
//! every group a kernel of its own (to time what joining saves on a card).

use super::ast::*;
use super::emit::{global_id, grid_stride, DeviceStep, Emitter, KernelArg, ProductInEpilogue, THREADS};
use super::group::{Location, THREAD_ROWS};
use super::side::{accesses, independent, step_accesses};
use super::single::rewrite_stmts;
use super::tiled::{walks_in_order, TilePlan};
use crate::kernel::{BufId, LoopKernel, MatMul, View};
use std::collections::HashMap;

/// Whether groups join tiled products' tails: by `with_row_tails`, else unless
/// `KILN_CUDA_ROW_TAIL=0`.
pub(super) static ROW_TAILS: super::Switch = super::Switch::new("KILN_CUDA_ROW_TAIL", true);

/// Runs `f` with groups joining tiled products' tails (`on`) or each kept a kernel of its own,
/// for every CUDA program this thread specializes, whatever the environment.
pub fn with_row_tails<R>(on: bool, f: impl FnOnce() -> R) -> R {
    ROW_TAILS.with(on, f)
}

/// At most this many steps emitted after the tiled kernel that a stage may move ahead of.
const MAX_PASSED: usize = 2;

/// A tiled product's kernel, which later groups may join as stages of its tail.
#[derive(Clone, Debug)]
pub(super) struct TiledKernel {
    mm: MatMul,
    plan: TilePlan,
    /// Where it is among the emitted kernels and steps.
    kernel: usize,
    step: usize,
    /// The buffers it writes laid out by the product's rows, with their row lengths: row `o` at
    /// elements `o * len .. (o + 1) * len` (the epilogue's outputs, then each stage's).
    row_laid: Vec<(BufId, usize)>,
    stages: usize,
}

impl TiledKernel {
    /// The tiled kernel of `mm` with its epilogue group `epilogue`, the emitter's last kernel.
    pub(super) fn new(e: &Emitter, mm: &MatMul, plan: TilePlan, epilogue: &[&LoopKernel]) -> TiledKernel {
        let row_laid = epilogue
            .iter()
            .filter(|k| {
                k.reduce.is_none()
                    && k.shape.iter().product::<usize>() == mm.m * mm.n
                    && walks_in_order(&k.out, &k.shape)
            })
            .map(|k| (k.out.buf, mm.n))
            .collect();
        let kernel = e.kernels.len() - 1;
        let step = e.steps.len() - 1;
        TiledKernel { mm: mm.clone(), plan, kernel, step, row_laid, stages: 0 }
    }

    /// Whether a stage may still join: few enough steps emitted since to move ahead of.
    pub(super) fn open(&self, e: &Emitter) -> bool {
        e.steps.len() - 1 - self.step <= MAX_PASSED
    }

    /// The most rows a block finishes (`finished_rows`).
    fn rows_per_block(&self) -> usize {
        if self.plan.slices > 1 && self.plan.cluster {
            self.plan.cluster_share()
        } else {
            self.plan.bm
        }
    }

    fn row_len(&self, buf: BufId) -> Option<usize> {
        self.row_laid.iter().find(|(b, _)| *b == buf).map(|&(_, len)| len)
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
        let per = plan.cluster_share();
        let share_end = var("tail_first") + int(per as i64);
        // Unclipped only where the shares cut the tile exactly and tiles the product.
        let exact = per * plan.slices == plan.bm && m.is_multiple_of(plan.bm);
        let end = if exact { share_end } else { clip(share_end, tile_end) };
        return (None, row0 + cast(it, var("slice")) * int(per as i64), end);
    }
    let guard = (plan.slices > 1).then(|| index(var("last_block"), int(0)));
    (guard, row0, tile_end)
}

/// How a stage's kernel walks its work, read from its body: one grid-stride loop from the first
/// thread, over the rows (`o`, a thread per row) or over the rows' elements (`i`, `width` a
/// row), reading no block index or size elsewhere; its arguments all buffers.
enum Walk {
    Rows,
    Elements { width: usize },
}

fn walk_of(stage: &Kernel, args: &[KernelArg], m: usize) -> Option<(Walk, CType, Vec<Stmt>)> {
    let [Stmt::For { ty, var: v, init, end, step, body }] = &stage.body[..] else { return None };
    let grid_stride_loop = *init == global_id(*ty) && *step == grid_stride(*ty);
    let buffers_only = args.iter().all(|a| matches!(a, KernelArg::Buf(_)));
    if !grid_stride_loop || !buffers_only || mentions_block_builtins(body) {
        return None;
    }
    let Expr::Int(n) = *end else { return None };
    let n = usize::try_from(n).ok()?;
    let walk = match v.as_str() {
        "o" if n == m => Walk::Rows,
        "i" if n.is_multiple_of(m) => Walk::Elements { width: n / m },
        _ => return None,
    };
    Some((walk, *ty, body.clone()))
}

impl Emitter<'_> {
    /// Whether the group `members` (`product`: the product its first member is the epilogue of)
    /// can be a stage of `target`'s tail (see the module's comment), and the product computed
    /// in its epilogue where there is one (`Some(None)`: a stage without a product).
    pub(super) fn tail_stage(
        &self,
        target: &TiledKernel,
        product: Option<&MatMul>,
        members: &[&LoopKernel],
        at: usize,
    ) -> Option<Option<ProductInEpilogue>> {
        let (m, plan) = (target.mm.m, &target.plan);
        let primary = members[0];
        if !ROW_TAILS.on() || plan.tiles_n != 1 || plan.bm > THREADS as usize || !target.open(self) {
            return None;
        }
        if members.iter().any(|k| k.shape.first() != Some(&m)) {
            return None;
        }
        let kernel = &self.kernels[target.kernel];
        let DeviceStep::Launch(launch) = &self.steps[target.step] else { return None };
        let (reads, writes) = accesses(kernel, &launch.args, &self.loc);
        let written = |b: BufId| writes.contains(&self.loc[b]);
        let in_epilogue = match (primary.reduce, product) {
            (Some((_, reduced)), None) => {
                let kept = primary.shape.len() - reduced;
                let row_len: usize = primary.shape[kept..].iter().product();
                (kept == 1 && row_len <= THREAD_ROWS).then_some(None)?
            }
            (None, None) => None,
            (None, Some(mm)) => {
                // Each element's dot product in the thread, its row of `a` one the stages wrote
                // (or one written before the kernel), `b` untouched by the kernel.
                let short = mm.batch == 1 && mm.m == m && !mm.a_transposed && mm.k <= super::emit::dot_depth();
                let a_ok = !written(mm.a) || target.row_len(mm.a) == Some(mm.k);
                if !short || !a_ok || written(mm.b) {
                    return None;
                }
                let p = self.product_in_epilogue(mm, members, at)?;
                let in_order = primary.shape.iter().product::<usize>() == mm.m * mm.n
                    && walks_in_order(&primary.inputs[p.input], &primary.shape);
                Some(in_order.then_some(p)?)
            }
            (Some(_), Some(_)) => return None,
        };
        // A stage's threads each do no more than a thread of its own kernel would: at most
        // `DOT_DEPTH` multiply-adds (or elements). A tail runs on the tiled kernel's blocks
        // only, which are few where tiles are sliced (fmnist-mlp's logits: 32 blocks of 4 rows);
        // spread over its own grid, a larger stage takes more SMs' caches (a 250x30 weight read
        // transposed, a word a line, costs a wavefront a word).
        let width: usize = primary.shape[1..].iter().product();
        let depth = in_epilogue.as_ref().map_or(1, |p| p.mm.k);
        let per_thread = (target.rows_per_block() * width * depth).div_ceil(THREADS as usize);
        if primary.reduce.is_none() && per_thread > super::emit::dot_depth() {
            return None;
        }
        // Ahead of the steps emitted since the tiled kernel only where independent of them
        // (checked again on the emitted kernel, `attach_tail_stage`).
        let mut group_reads: Vec<Location> =
            members.iter().flat_map(|k| k.inputs.iter().map(|v| self.loc[v.buf])).collect();
        group_reads.extend(in_epilogue.as_ref().map(|p| [self.loc[p.mm.a], self.loc[p.mm.b]]).into_iter().flatten());
        let group = (group_reads, members.iter().map(|k| self.loc[k.out.buf]).collect());
        if !self.steps[target.step + 1..]
            .iter()
            .all(|s| independent(&step_accesses(s, &self.kernels, &self.loc), &group))
        {
            return None;
        }
        let fits = members.iter().enumerate().all(|(mi, k)| {
            let inputs_ok = k.inputs.iter().enumerate().all(|(j, v)| {
                let the_product = in_epilogue.as_ref().is_some_and(|p| mi == 0 && j == p.input);
                the_product
                    || !written(v.buf)
                    || target.row_len(v.buf).is_some_and(|len| within_own_row(v, &k.shape, len))
            });
            let out = self.loc[k.out.buf];
            inputs_ok && !reads.contains(&out) && !writes.contains(&out)
        });
        fits.then_some(in_epilogue)
    }

    /// Moves the kernel emitted last (the stage's, `members` its group) into `target`'s tail;
    /// false where it stays a kernel of its own (its body not one of the walks a stage takes, or
    /// touching memory that a step emitted between them touches, one of them writing it).
    pub(super) fn attach_tail_stage(&mut self, target: &mut TiledKernel, members: &[&LoopKernel]) -> bool {
        let (Some(stage), Some(DeviceStep::Launch(stage_launch))) = (self.kernels.last(), self.steps.last()) else {
            return false;
        };
        let Some((walk, it, body)) = walk_of(stage, &stage_launch.args, target.mm.m) else { return false };
        let own = accesses(stage, &stage_launch.args, &self.loc);
        let last = self.steps.len() - 1;
        let passed = &self.steps[target.step + 1..last];
        if !passed.iter().all(|s| independent(&step_accesses(s, &self.kernels, &self.loc), &own)) {
            return false;
        }
        let (Some(stage), Some(DeviceStep::Launch(stage_launch))) = (self.kernels.pop(), self.steps.pop()) else {
            unreachable!("checked above")
        };
        let DeviceStep::Launch(launch) = &mut self.steps[target.step] else { unreachable!("a tiled kernel's launch") };
        let kernel = &mut self.kernels[target.kernel];
        target.stages += 1;
        let prefix = if target.stages == 1 { "tail".to_string() } else { format!("tail{}", target.stages) };
        attach(&self.loc, target, kernel, launch, stage, stage_launch.args, &prefix, (walk, it, body));
        for k in members {
            let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
            let rows = &k.shape[..kept];
            if walks_in_order(&k.out, rows) {
                target.row_laid.push((k.out.buf, rows[1..].iter().product()));
            }
        }
        true
    }
}

/// Appends the stage's kernel `stage` (launched with `args`, walking as `walk` says) to the end
/// of `target`'s kernel `kernel` (launched by `launch`): its parameters renamed `{prefix}_...`,
/// its walk over the rows the block finished, after a barrier (past which the block's stores are
/// visible to all its threads). Memory the two share, one of them writing it, loses
/// `__restrict__` on both sides.
#[allow(clippy::too_many_arguments)]
fn attach(
    loc: &[Location],
    target: &TiledKernel,
    kernel: &mut Kernel,
    launch: &mut super::emit::Launchable,
    stage: Kernel,
    args: Vec<KernelArg>,
    prefix: &str,
    (walk, it, mut body): (Walk, CType, Vec<Stmt>),
) {
    let names: HashMap<String, String> =
        stage.params.iter().map(|p| (p.name.clone(), format!("{prefix}_{}", p.name))).collect();
    rewrite_stmts(&mut body, &names, &|_| None);
    let (guard, first, end) = finished_rows(&target.plan, target.mm.m, it);
    let thread = || cast(it, Expr::Builtin(Builtin::ThreadIdx));
    let mut rows = vec![Stmt::SyncThreads, decl(it, "tail_first", first), decl(it, "tail_end", end)];
    match walk {
        // A tile has at most as many rows as the block has threads: a row a thread, no loop.
        Walk::Rows => {
            rows.push(decl(it, "o", var("tail_first") + thread()));
            rows.push(Stmt::If(bin(BinOp::Lt, var("o"), var("tail_end")), body, vec![]));
        }
        Walk::Elements { width } => {
            let w = int(width as i64);
            rows.push(Stmt::For {
                ty: it,
                var: "i".into(),
                init: var("tail_first") * w.clone() + thread(),
                end: var("tail_end") * w,
                step: int(THREADS as i64),
                body,
            });
        }
    }
    kernel.body.push(Stmt::Comment(format!("{}: on the rows this block finished", stage.name)));
    kernel.body.push(match guard {
        Some(g) => Stmt::If(g, rows, vec![]),
        None => Stmt::Block(rows),
    });
    kernel.comments.push(format!("{} then runs {} on the rows each block finished:", kernel.name, stage.name));
    kernel.comments.extend(stage.comments.iter().map(|c| format!("  {c}")));
    let (stage_reads, stage_writes) = accesses(&stage, &args, loc);
    let (own_reads, own_writes) = accesses(kernel, &launch.args, loc);
    let shared_with = |l: Location, reads: &[Location], writes: &[Location], writing: bool| {
        writes.contains(&l) || (writing && reads.contains(&l))
    };
    for (p, a) in kernel.params.iter_mut().zip(&launch.args) {
        if let KernelArg::Buf(b) = a {
            let writing = matches!(p.kind, ParamKind::Out | ParamKind::InOut);
            if shared_with(loc[*b], &stage_reads, &stage_writes, writing) {
                p.kind = p.kind.without_restrict();
            }
        }
    }
    for (p, a) in stage.params.iter().zip(&args) {
        let KernelArg::Buf(b) = a else { unreachable!("a stage takes buffers only (walk_of)") };
        let writing = matches!(p.kind, ParamKind::Out | ParamKind::InOut);
        let kind = if shared_with(loc[*b], &own_reads, &own_writes, writing) {
            p.kind.without_restrict()
        } else {
            p.kind.clone()
        };
        kernel.params.push(Param { name: names[&p.name].clone(), kind, ..p.clone() });
        launch.args.push(*a);
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
