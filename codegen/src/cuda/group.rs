//! Vertical merging of consecutive loop kernels: an elementwise kernel that runs over the kept
//! index space of the kernel before it (elementwise, a reduction, or a product's epilogue) joins it
//! as a *follower*, computed by the same thread right after the value it depends on, which it takes
//! from a register instead of memory. The optimizer's update (`v = m v - lr g; p = p + v`) becomes one
//! kernel, a bias gradient's column sum carries the momentum and parameter updates, and an
//! activation joins the bias add that feeds it. A kernel joins only if every thread still touches
//! only its own index of everything the group writes: it may read a group member's output only at
//! the index that member wrote, and may write memory the group reads or writes only at that same
//! index. Memory is compared by physical location (the memory plan reuses slots), not by buffer.
//!
//! A reduction can follow a reduction over the same rows when rows are short enough for a thread
//! to reduce a whole row alone (`THREAD_ROWS`): the thread that finished row `o` of the first
//! reduces row `o` of the next, taking the first's result for that row from a register. The
//! softmax cross-entropy's row maximum, row sum of exponentials and loss become one pass per row.

use crate::kernel::{BufKind, KernelProgram, LoopKernel, MemoryPlan, View};

/// Where a buffer's bytes live: two buffers with the same location share memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Location {
    Input(usize),
    Shared(usize),
    Slot(usize),
    /// A buffer nothing allocates (never read or written by a step).
    Alone(usize),
}

pub(super) fn locations(kp: &KernelProgram, mem: &MemoryPlan) -> Vec<Location> {
    kp.buffers
        .iter()
        .enumerate()
        .map(|(b, buf)| match buf.kind {
            BufKind::Input(k) => Location::Input(k),
            BufKind::Shared(k) => Location::Shared(k),
            _ => mem.slot[b].map_or(Location::Alone(b), Location::Slot),
        })
        .collect()
}

/// At most this many followers per group (keeps kernels readable and registers few).
const MAX_FOLLOWERS: usize = 8;

/// Rows of at most this many elements are reduced by one thread each (`reduce::ReduceShape::
/// Thread`), whatever the launch: the one shape where a reduction can follow another.
pub(super) const THREAD_ROWS: usize = 16;

/// An elementwise kernel over whole rows follows a thread-per-row group only up to this many
/// elements (a loss's gradient at batch 4096 is 40,960).
const ROW_ELEMENTS: usize = 1 << 16;

fn kept_dims(k: &LoopKernel) -> usize {
    k.shape.len() - k.reduce.map_or(0, |r| r.1)
}

pub(super) fn same_view(a: &View, b: &View) -> bool {
    a.offset == b.offset && a.strides == b.strides
}

/// Whether input view `v` of a reduction over `kept` kept dims reads `out` (a member's output over
/// the kept dims) at the thread's own row: the same element for every element of the row.
fn reads_row_value(v: &View, out: &View, kept: usize) -> bool {
    v.offset == out.offset && v.strides[..kept] == out.strides[..] && v.strides[kept..].iter().all(|&s| s == 0)
}

/// Whether follower `k` of a group led by `primary` walks the primary's whole rows (a reduction
/// over them, or an elementwise kernel over every element of them) rather than its kept space.
pub(super) fn walks_rows(primary: &LoopKernel, k: &LoopKernel) -> bool {
    primary.reduce.is_some() && k.shape == primary.shape
}

/// Whether input `v` of follower `f` reads what member `w` wrote, at the index the thread owns:
/// for a follower walking whole rows, a row value at its row or (`w` walking rows too) the same
/// element; otherwise the same index.
fn reads_own(primary: &LoopKernel, f: &LoopKernel, v: &View, w: &View) -> bool {
    if !walks_rows(primary, f) {
        return same_view(w, v);
    }
    let kept = kept_dims(primary);
    v.strides.len() == f.shape.len()
        && if w.strides.len() == kept { reads_row_value(v, w, kept) } else { same_view(w, v) }
}

/// Whether `cand` can follow the group `members` (the primary first).
pub(super) fn can_follow(loc: &[Location], members: &[&LoopKernel], cand: &LoopKernel) -> bool {
    let primary = members[0];
    if members.len() > MAX_FOLLOWERS {
        return false;
    }
    let row_len: usize = primary.shape[kept_dims(primary)..].iter().product();
    let fits = match (cand.reduce, primary.reduce) {
        (None, _) if cand.shape[..] == primary.shape[..kept_dims(primary)] => true,
        // Every element of the same short rows, by the thread that owns the row: only for small
        // kernels, where a launch costs more than the parallelism a thread per element would add.
        (None, Some(_)) => {
            cand.shape == primary.shape
                && row_len <= THREAD_ROWS
                && cand.shape.iter().product::<usize>() <= ROW_ELEMENTS
        }
        // A reduction over the same short rows, each reduced by the thread that owns it.
        (Some(c), Some(p)) => c.1 == p.1 && cand.shape == primary.shape && row_len <= THREAD_ROWS,
        _ => false,
    };
    if !fits {
        return false;
    }
    let writes: Vec<(Location, &View)> = members.iter().map(|m| (loc[m.out.buf], &m.out)).collect();
    // Reads at other indices than the thread's own: every input of a reduction.
    let mut reads: Vec<(Location, &View, bool)> =
        primary.inputs.iter().map(|v| (loc[v.buf], v, primary.reduce.is_some())).collect();
    for m in &members[1..] {
        reads.extend(m.inputs.iter().map(|v| (loc[v.buf], v, false)));
    }
    let inputs_ok = cand
        .inputs
        .iter()
        .all(|v| writes.iter().filter(|w| w.0 == loc[v.buf]).all(|w| reads_own(primary, cand, v, w.1)));
    let o = &cand.out;
    // A follower reading a row value at its own row reads what `cand` would write at that row
    // only in the same thread, earlier: safe.
    let kept = kept_dims(primary);
    let own_row = |r: &View| {
        primary.reduce.is_some()
            && r.strides.len() == primary.shape.len()
            && o.strides.len() == kept
            && reads_row_value(r, o, kept)
    };
    // Where a thread reduces whole rows, even the first member reads only its own row, before
    // any follower writes: writing what it read at the same element is safe.
    let thread_rows = primary.reduce.is_some() && row_len <= THREAD_ROWS;
    let out_ok = reads
        .iter()
        .filter(|r| r.0 == loc[o.buf])
        .all(|r| (thread_rows || !r.2) && (same_view(r.1, o) || own_row(r.1)))
        && writes.iter().filter(|w| w.0 == loc[o.buf]).all(|w| same_view(w.1, o));
    inputs_ok && out_ok
}

/// For each input of follower `f` (index into `members`), the member whose output it takes from a
/// register (the last one that wrote that memory), if any. What a member walking whole rows wrote
/// element by element is read back from memory (the same thread wrote it, in an earlier loop).
pub(super) fn forwarded(loc: &[Location], members: &[&LoopKernel], f: usize) -> Vec<Option<usize>> {
    let primary = members[0];
    members[f]
        .inputs
        .iter()
        .map(|v| {
            let writer = (0..f).rev().find(|&m| loc[members[m].out.buf] == loc[v.buf]);
            writer.filter(|&m| {
                let element_wise_row = m > 0 && walks_rows(primary, members[m]) && members[m].reduce.is_none();
                reads_own(primary, members[f], v, &members[m].out) && !element_wise_row
            })
        })
        .collect()
}

/// The group's kernels with their dims collapsed together: dims merge only where every view of
/// every member allows it, so all members index one common space. Followers' views cover the kept
/// dims only.
pub(super) fn collapse_group(members: &[&LoopKernel]) -> Vec<LoopKernel> {
    let primary = members[0];
    let dims = primary.shape.len();
    let pad = |v: &View| {
        let mut s = v.strides.clone();
        s.resize(dims, 0);
        View { buf: v.buf, offset: v.offset, strides: s }
    };
    let mut all = primary.clone();
    for m in &members[1..] {
        all.inputs.extend(m.inputs.iter().map(pad));
        all.inputs.push(pad(&m.out));
    }
    let c = crate::kernel::collapse(&all);
    let kept = kept_dims(&c);
    let mut views = c.inputs.into_iter();
    let mut out = vec![LoopKernel {
        inputs: views.by_ref().take(primary.inputs.len()).collect(),
        shape: c.shape.clone(),
        out: c.out.clone(),
        reduce: c.reduce,
        ..primary.clone()
    }];
    let cut = |v: View| View { strides: v.strides[..kept].to_vec(), ..v };
    for m in &members[1..] {
        if walks_rows(primary, m) {
            // A follower walking whole rows keeps the whole space; a reduction's output is over
            // the kept dims, an elementwise kernel's over all of them.
            let inputs = views.by_ref().take(m.inputs.len()).collect();
            let o = views.next().expect("one view per follower output");
            let o = if m.reduce.is_some() { cut(o) } else { o };
            // A reduction's own operation, over the reduced dims as collapsed for the whole group.
            let reduce = m.reduce.zip(c.reduce).map(|((op, _), (_, n))| (op, n));
            out.push(LoopKernel { inputs, out: o, shape: c.shape.clone(), reduce, ..(*m).clone() });
            continue;
        }
        let inputs = views.by_ref().take(m.inputs.len()).map(cut).collect();
        let o = cut(views.next().expect("one view per follower output"));
        out.push(LoopKernel { inputs, out: o, shape: c.shape[..kept].to_vec(), reduce: None, ..(*m).clone() });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::ops::fused::ScalarExpr;
    use kiln_ir::ops::ReduceOp;
    use kiln_ir::DType;

    fn view(buf: usize, strides: &[isize]) -> View {
        View { buf, offset: 0, strides: strides.to_vec() }
    }

    /// An elementwise (or, with `reduce`, reducing) kernel over `shape` reading `inputs`.
    fn kernel(shape: &[usize], inputs: Vec<View>, out: View, reduce: Option<(ReduceOp, usize)>) -> LoopKernel {
        let n = inputs.len();
        LoopKernel {
            name: "k".into(),
            origin: vec![],
            shape: shape.to_vec(),
            input_dtypes: vec![DType::F32; n],
            exprs: (0..n).map(ScalarExpr::Input).collect(),
            inputs,
            out,
            out_dtype: DType::F32,
            reduce,
        }
    }

    /// Buffers 0..8 each in their own memory, except where `shared` says two share a slot.
    fn locs(shared: &[(usize, usize)]) -> Vec<Location> {
        (0..8).map(|b| Location::Slot(shared.iter().find(|s| s.0 == b).map_or(b, |s| s.1))).collect()
    }

    #[test]
    fn a_consumer_at_the_same_index_follows_and_takes_the_register() {
        let loc = locs(&[]);
        let a = kernel(&[4, 3], vec![view(0, &[3, 1])], view(1, &[3, 1]), None);
        let b = kernel(&[4, 3], vec![view(1, &[3, 1]), view(2, &[3, 1])], view(3, &[3, 1]), None);
        assert!(can_follow(&loc, &[&a], &b));
        assert_eq!(forwarded(&loc, &[&a, &b], 1), vec![Some(0), None]);
    }

    #[test]
    fn reading_another_threads_element_does_not_follow() {
        let loc = locs(&[]);
        let a = kernel(&[4, 4], vec![view(0, &[4, 1])], view(1, &[4, 1]), None);
        // b reads a's output transposed: element (i, j) needs what thread (j, i) wrote
        let b = kernel(&[4, 4], vec![view(1, &[1, 4])], view(3, &[4, 1]), None);
        assert!(!can_follow(&loc, &[&a], &b));
    }

    #[test]
    fn overwriting_what_a_reduction_reads_does_not_follow() {
        let loc = locs(&[]);
        // column sums of buffer 0 into buffer 1, then an update writing buffer 0 in place
        let sum = kernel(&[3, 4], vec![view(0, &[1, 3])], view(1, &[1]), Some((ReduceOp::Sum, 1)));
        let update = kernel(&[3], vec![view(1, &[1])], view(0, &[1]), None);
        assert!(!can_follow(&loc, &[&sum], &update));
        // writing elsewhere is fine, and the sum arrives through a register
        let update = kernel(&[3], vec![view(1, &[1])], view(2, &[1]), None);
        assert!(can_follow(&loc, &[&sum], &update));
        assert_eq!(forwarded(&loc, &[&sum, &update], 1), vec![Some(0)]);
    }

    #[test]
    fn memory_is_compared_by_slot_not_by_buffer() {
        // buffer 5 reuses the slot of buffer 0, which the first kernel reads at another index
        let loc = locs(&[(5, 0)]);
        let a = kernel(&[4, 4], vec![view(0, &[1, 4])], view(1, &[4, 1]), None);
        let b = kernel(&[4, 4], vec![view(1, &[4, 1])], view(5, &[4, 1]), None);
        assert!(!can_follow(&loc, &[&a], &b));
        // at the same index it is safe: each thread reads its element before writing it
        let a = kernel(&[4, 4], vec![view(0, &[4, 1])], view(1, &[4, 1]), None);
        assert!(can_follow(&loc, &[&a], &b));
    }

    #[test]
    fn a_reduction_over_the_same_short_rows_follows_and_takes_the_row_value() {
        let loc = locs(&[]);
        // row maxima of buffer 0 into 1, then sum(exp(x - max)) reading the maxima per row
        let max = kernel(&[4, 10], vec![view(0, &[10, 1])], view(1, &[1]), Some((ReduceOp::Max, 1)));
        let sum = kernel(&[4, 10], vec![view(0, &[10, 1]), view(1, &[1, 0])], view(2, &[1]), Some((ReduceOp::Sum, 1)));
        assert!(can_follow(&loc, &[&max], &sum));
        assert_eq!(forwarded(&loc, &[&max, &sum], 1), vec![None, Some(0)]);
        // rows too long for a thread each, or another reduced space: no
        let (max_long, sum_long) = (
            kernel(&[4, 100], vec![view(0, &[100, 1])], view(1, &[1]), Some((ReduceOp::Max, 1))),
            kernel(&[4, 100], vec![view(0, &[100, 1]), view(1, &[1, 0])], view(2, &[1]), Some((ReduceOp::Sum, 1))),
        );
        assert!(!can_follow(&loc, &[&max_long], &sum_long));
        let cols = kernel(&[10, 4], vec![view(0, &[1, 10])], view(2, &[1]), Some((ReduceOp::Sum, 1)));
        assert!(!can_follow(&loc, &[&max], &cols));
        // reading the maxima at another row than the thread's own: no
        let shifted = kernel(&[4, 10], vec![view(1, &[0, 1])], view(2, &[1]), Some((ReduceOp::Sum, 1)));
        assert!(!can_follow(&loc, &[&max], &shifted));
    }

    #[test]
    fn followers_run_over_the_kept_space_or_short_whole_rows() {
        let loc = locs(&[]);
        // Rows of 100: a block per row, so only the kept space can follow.
        let sum = kernel(&[3, 100], vec![view(0, &[100, 1])], view(1, &[1]), Some((ReduceOp::Sum, 1)));
        let whole_rows = kernel(&[3, 100], vec![view(0, &[100, 1])], view(2, &[100, 1]), None);
        assert!(!can_follow(&loc, &[&sum], &whole_rows));
        let reducing = kernel(&[3], vec![view(1, &[1])], view(2, &[]), Some((ReduceOp::Sum, 1)));
        assert!(!can_follow(&loc, &[&sum], &reducing));
        // Rows of 4: a thread per row, which can go on over every element of its row, reading the
        // row's sum from a register and writing over what the reduction read, at the same element.
        let sum = kernel(&[3, 4], vec![view(0, &[4, 1])], view(1, &[1]), Some((ReduceOp::Sum, 1)));
        let scaled = kernel(&[3, 4], vec![view(0, &[4, 1]), view(1, &[1, 0])], view(0, &[4, 1]), None);
        assert!(can_follow(&loc, &[&sum], &scaled));
        assert_eq!(forwarded(&loc, &[&sum, &scaled], 1), vec![None, Some(0)]);
        // ...but not write another row's element.
        let shifted = kernel(&[3, 4], vec![view(0, &[4, 1])], View { buf: 0, offset: 4, strides: vec![4, 1] }, None);
        assert!(!can_follow(&loc, &[&sum], &shifted));
    }
}
