//! Vertical merging of consecutive loop kernels: an elementwise kernel that runs over the kept
//! index space of the kernel before it (elementwise, a reduction, or a product's epilogue) joins it
//! as a *follower*, computed by the same thread right after the value it depends on, which it takes
//! from a register instead of memory. The optimizer's update (`v = m v - lr g; p = p + v`) becomes one
//! kernel, a bias gradient's column sum carries the momentum and parameter updates, and an
//! activation joins the bias add that feeds it. A kernel joins only if every thread still touches
//! only its own index of everything the group writes: it may read a group member's output only at
//! the index that member wrote, and may write memory the group reads or writes only at that same
//! index. Memory is compared by physical location (the memory plan reuses slots), not by buffer.

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

fn kept_dims(k: &LoopKernel) -> usize {
    k.shape.len() - k.reduce.map_or(0, |r| r.1)
}

fn same_view(a: &View, b: &View) -> bool {
    a.offset == b.offset && a.strides == b.strides
}

/// Whether `cand` can follow the group `members` (the primary first).
pub(super) fn can_follow(loc: &[Location], members: &[&LoopKernel], cand: &LoopKernel) -> bool {
    let primary = members[0];
    if cand.reduce.is_some() || members.len() > MAX_FOLLOWERS || cand.shape[..] != primary.shape[..kept_dims(primary)] {
        return false;
    }
    let writes: Vec<(Location, &View)> = members.iter().map(|m| (loc[m.out.buf], &m.out)).collect();
    // Reads at other indices than the thread's own: every input of a reduction.
    let mut reads: Vec<(Location, &View, bool)> =
        primary.inputs.iter().map(|v| (loc[v.buf], v, primary.reduce.is_some())).collect();
    for m in &members[1..] {
        reads.extend(m.inputs.iter().map(|v| (loc[v.buf], v, false)));
    }
    let inputs_ok = cand.inputs.iter().all(|v| writes.iter().filter(|w| w.0 == loc[v.buf]).all(|w| same_view(w.1, v)));
    let o = &cand.out;
    let out_ok = reads.iter().filter(|r| r.0 == loc[o.buf]).all(|r| !r.2 && same_view(r.1, o))
        && writes.iter().filter(|w| w.0 == loc[o.buf]).all(|w| same_view(w.1, o));
    inputs_ok && out_ok
}

/// For each input of follower `f` (index into `members`), the member whose output it takes from a
/// register (the last one that wrote that memory), if any.
pub(super) fn forwarded(loc: &[Location], members: &[&LoopKernel], f: usize) -> Vec<Option<usize>> {
    members[f]
        .inputs
        .iter()
        .map(|v| (0..f).rev().find(|&m| loc[members[m].out.buf] == loc[v.buf] && same_view(&members[m].out, v)))
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
        let inputs = views.by_ref().take(m.inputs.len()).map(cut).collect();
        let o = cut(views.next().expect("one view per follower output"));
        out.push(LoopKernel { inputs, out: o, shape: c.shape[..kept].to_vec(), reduce: None, ..(*m).clone() });
    }
    out
}
