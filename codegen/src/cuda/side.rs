//! Independent kernels side by side: consecutive kernels that touch disjoint memory (memory
//! compared by physical location, as the memory plan reuses slots; reads of the same memory are
//! fine) and use blocks of the same size become one kernel whose grid is split between them. Blocks
//! `[0, G0)` run the first section's body, `[G0, G0 + G1)` the second's, and so on (sections in
//! the order their blocks should start, the longest-running first: `longest_first`): each section
//! reads `blockIdx` relative to its first block and `gridDim` as its own grid, and a section
//! written for a two-dimensional block (a 32x8 reduction tile) reads its thread indices from the
//! flat ones, and one written for a two-dimensional grid (a split reduction) its block indices from
//! its range of the flat grid. A whole block runs one section, so block barriers stay correct, and
//! the sections' shared arrays overlap in one `__shared__` union (the kernel needs the largest
//! section's shared memory, not their sum). In a training step this puts a layer's bias gradient
//! beside its weight update: one launch (one graph node) fewer each, and the two run at the same
//! time instead of one after the other.

use super::ast::*;
use super::emit::{DeviceStep, KernelArg, Launchable, MAX_GRID};
use super::group::Location;
use super::single::{rewrite_stmts, section_names};

/// At most this many kernels per joined kernel (keeps kernels readable).
const MAX_SECTIONS: usize = 4;

/// SMs of the cards kiln's estimates are made for (an H100 or H200), each holding as many blocks
/// of a kernel at once as its register budget says (`Kernel::min_blocks`).
const SMS: usize = 132;

/// Shared memory a joined kernel may take: the 48 KiB a kernel may declare statically, so that
/// joining never moves arrays out of static shared memory; where a section alone takes more (a
/// tile on tensor cores, in dynamic shared memory: `dynamic_shared.rs`), as much as still lets
/// two blocks share an SM of the target card, as such a tile may take.
fn joined_shared_limit(largest_section: usize) -> usize {
    let statically = super::dynamic_shared::STATIC_BYTES;
    if largest_section <= statically {
        statically
    } else {
        super::dynamic_shared::target_two_blocks_an_sm().max(largest_section)
    }
}

/// The name of a side-by-side kernel's union of its sections' shared arrays.
pub(crate) const SHARED_UNION: &str = "smem";

/// Bytes a shared array may take beyond its elements in a union's struct (its alignment).
const ALIGN_SLACK: usize = 16;

fn is_shared_array(s: &Stmt) -> bool {
    matches!(s, Stmt::SharedArray { .. })
}

/// The bytes of the `__shared__` arrays a kernel declares: at the top of its body (what a
/// side-by-side kernel overlaps with its other sections', each array perhaps padded), and nested
/// in its statements.
fn shared_bytes(body: &[Stmt]) -> (usize, usize) {
    let (arrays, rest): (Vec<&Stmt>, Vec<&Stmt>) = body.iter().partition(|s| is_shared_array(s));
    let bytes = |stmts: &[&Stmt]| stmts.iter().map(|s| stmt_shared_bytes(s)).sum::<usize>();
    (bytes(&arrays) + ALIGN_SLACK * arrays.len(), bytes(&rest))
}

/// The bytes of every `__shared__` array a statement declares.
fn stmt_shared_bytes(s: &Stmt) -> usize {
    let all = |body: &[Stmt]| body.iter().map(stmt_shared_bytes).sum::<usize>();
    match s {
        Stmt::SharedArray { ty, len, .. } => len * ty.size(),
        Stmt::SharedUnion { members, .. } => {
            members.iter().map(|(_, arrays)| all(arrays) + ALIGN_SLACK * arrays.len()).max().unwrap_or(0)
        }
        Stmt::If(_, a, b) => all(a) + all(b),
        Stmt::For { body, .. } | Stmt::Block(body) => all(body),
        _ => 0,
    }
}

/// The memory a launch reads and writes.
pub(super) fn accesses(k: &Kernel, args: &[KernelArg], loc: &[Location]) -> (Vec<Location>, Vec<Location>) {
    let (mut reads, mut writes) = (vec![], vec![]);
    for (p, a) in k.params.iter().zip(args) {
        // Scratch memory is the kernel's own; the error word is only ever set to a code.
        let KernelArg::Buf(b) = a else { continue };
        match p.kind {
            ParamKind::In | ParamKind::InAliased => reads.push(loc[*b]),
            ParamKind::Out => writes.push(loc[*b]),
            ParamKind::InOut => {
                reads.push(loc[*b]);
                writes.push(loc[*b]);
            }
            ParamKind::Value => {}
        }
    }
    (reads, writes)
}

/// Whether launch `b` can run beside the launches of `group` (all before it in step order).
pub(super) fn can_join(loc: &[Location], kernels: &[Kernel], group: &[&Launchable], b: &Launchable) -> bool {
    let kernel = |l: &Launchable| kernels.iter().find(|k| k.name == l.kernel).expect("every launch has its kernel");
    let threads = |l: &Launchable| l.launch.block.0 * l.launch.block.1;
    let first = group[0];
    let grid: usize = group.iter().map(|l| blocks(l)).sum::<usize>() + blocks(b);
    // The blocks a clustered section may skip to start on a cluster's first (`join`) count too.
    let skippable = (group.len() + 1) * super::cluster::MAX_CLUSTER;
    if group.len() >= MAX_SECTIONS || blocks(b) == 0 || grid + skippable > MAX_GRID {
        return false;
    }
    if threads(b) != threads(first) {
        return false;
    }
    // The joined kernel's clusters must each lie within one section: all clustered launches have
    // one size (the others' blocks are in clusters too, which never wait at a cluster barrier),
    // and `join` starts each clustered section on a cluster's first block.
    // `KILN_CUDA_CLUSTERS_FIRST=1` joins a clustered launch only where it starts on one in step
    // order, as before (fmnist-mlp's loss and first backward product then ran in two kernels).
    let sizes = group.iter().chain(std::iter::once(&b)).map(|l| l.launch.cluster).filter(|&c| c > 1);
    let cluster = sizes.clone().max().unwrap_or(1);
    let starts_a_cluster = (grid - blocks(b)).is_multiple_of(cluster as usize);
    if sizes.clone().any(|c| c != cluster) || (b.launch.cluster > 1 && !starts_a_cluster && CLUSTERS_FIRST.on()) {
        return false;
    }
    // A section that asks for fewer blocks an SM (more registers a thread) lowers the whole
    // kernel's budget: not where the joined grid would then need a second wave.
    let before = group.iter().filter_map(|l| kernel(l).min_blocks).min();
    let after = before.into_iter().chain(kernel(b).min_blocks).min();
    if let (Some(before), Some(after)) = (before, after) {
        if after < before && grid > SMS * after as usize {
            return false;
        }
    }
    // The sections' top-level arrays overlap; nested ones are each the kernel's own.
    let sizes: Vec<(usize, usize)> =
        group.iter().chain(std::iter::once(&b)).map(|l| shared_bytes(&kernel(l).body)).collect();
    let shared = sizes.iter().map(|s| s.0).max().unwrap_or(0) + sizes.iter().map(|s| s.1).sum::<usize>();
    let largest = sizes.iter().map(|s| s.0 + s.1).max().unwrap_or(0);
    if shared > joined_shared_limit(largest) {
        return false;
    }
    let mem_b = accesses(kernel(b), &b.args, loc);
    group.iter().all(|a| independent(&accesses(kernel(a), &a.args, loc), &mem_b))
}

/// The blocks of a launch's grid.
fn blocks(l: &Launchable) -> usize {
    l.launch.grid.0 as usize * l.launch.grid.1 as usize
}

/// Whether a launch can start a side-by-side group.
pub(super) fn can_start(l: &Launchable) -> bool {
    blocks(l) > 0
}

/// Joins `kernels` (each launched once, in order, by `launches`) side by side into one kernel.
pub(super) fn join(kernels: Vec<Kernel>, launches: Vec<Launchable>) -> (Kernel, DeviceStep) {
    // Named in step order, whatever order the sections' blocks come in.
    let prefixes: Vec<&str> = launches[1..].iter().map(|l| l.kernel.split('_').next().unwrap_or(&l.kernel)).collect();
    let name = format!("{}_and_{}", launches[0].kernel, prefixes.join("_"));
    let macs = |l: &Launchable| kernels.iter().find(|k| k.name == l.kernel).map_or(0, |k| k.macs_per_thread);
    let launches = longest_first(launches, &macs);
    let first = &launches[0];
    let threads = first.launch.block.0 * first.launch.block.1;
    let mut comments =
        vec![format!("{name} runs {} independent kernels side by side, blocks split between them:", launches.len())];
    let (mut params, mut args, mut sections) = (vec![], vec![], vec![]);
    // Every cluster lies within one section: a clustered section starts on a cluster's first
    // block (the blocks before it that it skips run nothing), its grid being whole clusters.
    let cluster = launches.iter().map(|l| l.launch.cluster).max().unwrap_or(1);
    let mut start = 0u32;
    for (s, l) in launches.iter().enumerate() {
        let k = kernels.iter().find(|k| k.name == l.kernel).expect("every launch has its kernel");
        let ((gx, gy), (bx, by)) = (l.launch.grid, l.launch.block);
        let grid = gx * gy;
        if l.launch.cluster > 1 && !start.is_multiple_of(cluster) {
            let skipped = start.next_multiple_of(cluster);
            comments.push(format!("  blocks [{start}, {skipped}): none (a cluster's first block next)"));
            sections.push((skipped, None, vec![]));
            start = skipped;
        }
        let names = section_names(s, k);
        params.extend(k.params.iter().map(|p| Param { name: names[&p.name].clone(), ..p.clone() }));
        args.extend_from_slice(&l.args);
        comments.push(format!("  blocks [{start}, {}): {}", start + grid, k.name));
        comments.extend(k.comments.iter().map(|c| format!("    {c}")));
        let tid = || cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx));
        let mut body = k.body.clone();
        // The section's own block index: from its first block on, its grid's x then y.
        let local = || {
            let b = cast(CType::Int, Expr::Builtin(Builtin::BlockIdx));
            if start > 0 {
                b - int(start as i64)
            } else {
                b
            }
        };
        rewrite_stmts(&mut body, &names, &|b| match b {
            Builtin::BlockIdx if gy > 1 => Some(local() % int(gx as i64)),
            Builtin::BlockIdxY if gy > 1 => Some(local() / int(gx as i64)),
            Builtin::BlockIdx if start > 0 => Some(local()),
            Builtin::GridDim => Some(int(gx as i64)),
            Builtin::BlockDim => Some(int(bx as i64)),
            Builtin::ThreadIdx if by > 1 => Some(tid() % int(bx as i64)),
            Builtin::ThreadIdxY if by > 1 => Some(tid() / int(bx as i64)),
            _ => None,
        });
        let end = start + grid;
        sections.push((end, Some(k.name.clone()), body));
        start = end;
    }
    // A grid of whole clusters: the blocks past the last section's run nothing.
    let padded = start.div_ceil(cluster) * cluster;
    // Where more than one section declares shared arrays (at the top of its body), they overlap
    // in one union: member `sN` holds section N's, which its code then names `smem.sN.array`.
    let mut union_members = vec![];
    if sections.iter().filter(|(_, _, body)| body.iter().any(is_shared_array)).count() > 1 {
        // Numbered as the sections' parameters are (the blocks a clustered section skips are none).
        for (s, (_, _, body)) in sections.iter_mut().filter(|(_, kname, _)| kname.is_some()).enumerate() {
            let (arrays, rest): (Vec<Stmt>, Vec<Stmt>) = std::mem::take(body).into_iter().partition(is_shared_array);
            *body = rest;
            if arrays.is_empty() {
                continue;
            }
            let member = format!("s{s}");
            let names = arrays
                .iter()
                .map(|a| {
                    let Stmt::SharedArray { name, .. } = a else { unreachable!("partitioned") };
                    (name.clone(), format!("{SHARED_UNION}.{member}.{name}"))
                })
                .collect();
            rewrite_stmts(body, &names, &|_| None);
            union_members.push((member, arrays));
        }
    }
    // if (blockIdx.x < end0) { section 0 } else if (blockIdx.x < end1) { section 1 } ...
    let mut tail: Vec<Stmt> = vec![];
    for (end, kname, body) in sections.into_iter().rev() {
        let mut then: Vec<Stmt> = kname.map(Stmt::Comment).into_iter().collect();
        then.extend(body);
        if tail.is_empty() && end == padded {
            tail = then;
        } else {
            let cond = bin(BinOp::Lt, cast(CType::Int, Expr::Builtin(Builtin::BlockIdx)), int(end as i64));
            tail = vec![Stmt::If(cond, then, tail)];
        }
    }
    if !union_members.is_empty() {
        tail.insert(0, Stmt::SharedUnion { name: SHARED_UNION.into(), members: union_members, dynamic: None });
    }
    if padded > start {
        comments.push(format!("  blocks [{start}, {padded}): none (the grid in whole clusters of {cluster})"));
    }
    let launch = Launch { grid: (padded, 1), block: (threads, 1), cluster };
    let min_blocks =
        launches.iter().filter_map(|l| kernels.iter().find(|k| k.name == l.kernel).and_then(|k| k.min_blocks)).min();
    let macs_per_thread = kernels.iter().map(|k| k.macs_per_thread).max().unwrap_or(0);
    let kernel = Kernel { name: name.clone(), comments, params, body: tail, launch, min_blocks, macs_per_thread };
    (kernel, DeviceStep::Launch(Launchable { kernel: name, args, launch }))
}

/// The sections in the order their blocks take the grid: by the multiply-adds a thread of theirs
/// does, most first, in step order where equal. The hardware hands out a grid's blocks in order,
/// so the blocks that run longest start first and the short ones fill the SMs beside them and
/// after them; in step order, fmnist-mlp-4k's 64 blocks of a 4096-deep weight gradient waited
/// behind 1152 blocks of a mask and a bias gradient before starting. Clustered sections take their
/// place like the others (`join` starts each on a cluster's first block). Put first of all, as
/// they were before, fmnist-mlp's second-layer weight gradient, sliced in clusters (128
/// multiply-adds a thread), took the first 256 blocks, and the last 60 of the first layer's (512
/// a thread) started only once those had finished: the grid of 464 passes a wave of 396.
/// `KILN_CUDA_LONGEST_FIRST=0` (`with_longest_first(false, ..)` for one thread) keeps step order
/// and `KILN_CUDA_CLUSTERS_FIRST=1` (`with_clusters_first(true, ..)`) the longest first after the
/// clustered sections (both as before: the clustered sections first), to time them on a card.
fn longest_first(mut launches: Vec<Launchable>, macs: &dyn Fn(&Launchable) -> usize) -> Vec<Launchable> {
    let by_macs = LONGEST_FIRST.on();
    let clusters_first = !by_macs || CLUSTERS_FIRST.on();
    launches.sort_by_key(|l| {
        (clusters_first && l.launch.cluster <= 1, std::cmp::Reverse(if by_macs { macs(l) } else { 0 }))
    });
    launches
}

/// Whether joined kernels' clustered sections take the grid's first blocks whatever their
/// threads' multiply-adds (`longest_first`), and a clustered launch joins only where it starts on
/// a cluster's first block in step order (`can_join`): both as before, to time the difference.
pub(super) static CLUSTERS_FIRST: super::Switch = super::Switch::new("KILN_CUDA_CLUSTERS_FIRST", false);

/// Runs `f` with the clustered sections of every joined kernel this thread specializes taking
/// the grid's first blocks (`on`), or taking their place by their multiply-adds, whatever the
/// environment.
pub fn with_clusters_first<R>(on: bool, f: impl FnOnce() -> R) -> R {
    CLUSTERS_FIRST.with(on, f)
}

/// Whether joined kernels' sections take the grid longest first (`longest_first`).
pub(super) static LONGEST_FIRST: super::Switch = super::Switch::new("KILN_CUDA_LONGEST_FIRST", true);

/// Runs `f` with the sections of every joined kernel this thread specializes taking the grid
/// longest first (`on`) or in step order, whatever the environment.
pub fn with_longest_first<R>(on: bool, f: impl FnOnce() -> R) -> R {
    LONGEST_FIRST.with(on, f)
}

/// How far ahead of a launch `join_all` looks for launches to run beside it: far enough for a
/// layer's weight gradient to move up beside the input gradient of the layer before it, through
/// the autoencoder's chain of eight (at 12, the decoder's ran in two kernels of their own at the
/// end of the step). `KILN_CUDA_LOOKAHEAD` (`with_bound(LOOKAHEAD_VAR, ..)` for one thread) sets
/// another, to time the difference on a card.
const LOOKAHEAD: usize = 64;

fn lookahead() -> usize {
    static STEPS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::bound_from_env(&STEPS, super::LOOKAHEAD_VAR, LOOKAHEAD)
}

/// The memory a step reads and writes.
pub(super) fn step_accesses(step: &DeviceStep, kernels: &[Kernel], loc: &[Location]) -> (Vec<Location>, Vec<Location>) {
    match step {
        DeviceStep::Launch(l) => {
            accesses(kernels.iter().find(|k| k.name == l.kernel).expect("every launch has its kernel"), &l.args, loc)
        }
        DeviceStep::Gemm(mm) => (vec![loc[mm.a], loc[mm.b]], vec![loc[mm.c]]),
        DeviceStep::GemmLt(g) => (g.reads().iter().map(|&b| loc[b]).collect(), vec![loc[g.mm.c]]),
    }
}

/// Whether two steps may run in either order: neither writes memory the other reads or writes.
pub(super) fn independent(a: &(Vec<Location>, Vec<Location>), b: &(Vec<Location>, Vec<Location>)) -> bool {
    let ((ra, wa), (rb, wb)) = (a, b);
    wa.iter().all(|l| !rb.contains(l) && !wb.contains(l)) && ra.iter().all(|l| !wb.contains(l))
}

/// The launch of step `s` (groups hold launches only).
fn launch_of(steps: &[DeviceStep], s: usize) -> &Launchable {
    match &steps[s] {
        DeviceStep::Launch(l) => l,
        DeviceStep::Gemm(_) | DeviceStep::GemmLt(_) => unreachable!("groups hold launches"),
    }
}

/// Whether a launch that would hold up a kernel the step waits for joins it anyway
/// (`holds_up_a_waited_kernel`): off unless `with_chain_joins(true, ..)` or
/// `KILN_CUDA_CHAIN_JOINS=1` lets it in, as before (to time the difference on a card).
pub(super) static CHAIN_JOINS: super::Switch = super::Switch::new("KILN_CUDA_CHAIN_JOINS", false);

/// Runs `f` with launches that would hold up a kernel the step waits for joining it (`on`, as
/// before) or kept out of it, for every CUDA program this thread specializes, whatever
/// the environment says.
pub fn with_chain_joins<R>(on: bool, f: impl FnOnce() -> R) -> R {
    CHAIN_JOINS.with(on, f)
}

/// Whether launch `j` joining `group` (steps of `steps`, the group's kernel placed at its first)
/// would hold up a kernel that the step waits for: one that a later step depends on, or that ends
/// the longest chain of dependencies (`level`, the step's end waits for it). It would if `j`'s
/// threads do more multiply-adds than any section's (the kernel would run longer), or if `j`
/// could start at least two steps of the chain earlier (it waits for the kernel's other
/// sections, and takes blocks beside them that the chain's work needs). On several streams such
/// a launch (a layer's weight gradient and update, which nothing in the step waits for) runs on a
/// stream of its own beside the chain rather than inside it: in the autoencoder, the last
/// layer's 4096 multiply-adds a thread kept the code layer's 16-block product, 256 a thread, from
/// ending until they were done, and a decoder weight gradient ready mid-chain ran in the step's
/// last kernel, in a second wave of its blocks.
fn holds_up_a_waited_kernel(
    steps: &[DeviceStep],
    kernels: &[Kernel],
    access: &[(Vec<Location>, Vec<Location>)],
    level: &[usize],
    group: &[usize],
    j: usize,
) -> bool {
    let macs = |s: usize| {
        let name = &launch_of(steps, s).kernel;
        kernels.iter().find(|k| &k.name == name).map_or(0, |k| k.macs_per_thread)
    };
    let deepest = level.iter().copied().max().unwrap_or(0);
    let waited = group.iter().any(|&g| level[g] == deepest)
        || (group[0] + 1..steps.len())
            .filter(|t| *t != j && !group.contains(t))
            .any(|t| group.iter().any(|&g| !independent(&access[g], &access[t])));
    let longer = group.iter().all(|&g| macs(g) < macs(j));
    let early = group.iter().any(|&g| level[j] + 2 <= level[g]);
    waited && (longer || early)
}

/// For each step, the length of the longest chain of dependencies that ends at it.
fn levels(access: &[(Vec<Location>, Vec<Location>)]) -> Vec<usize> {
    let mut level = vec![0; access.len()];
    for i in 0..access.len() {
        level[i] = (0..i).filter(|&d| !independent(&access[d], &access[i])).map(|d| level[d] + 1).max().unwrap_or(0);
    }
    level
}

/// Joins independent launches side by side (see `side`): each launch takes the later launches (up
/// to `LOOKAHEAD` steps on) that can run beside it and that may move up past every step between
/// (a layer's weight update, which must wait for the product reading the old weights, then runs
/// beside the next layer's input-gradient product instead of on its own). Where the step runs on
/// several streams (`concurrent`), a launch does not join a kernel that the step waits for if it
/// would hold it up (`holds_up_a_waited_kernel`): it runs on another stream instead, or joins
/// kernels nothing waits for.
pub(super) fn join_all(
    steps: Vec<DeviceStep>,
    mut kernels: Vec<Kernel>,
    loc: &[Location],
    concurrent: bool,
) -> (Vec<DeviceStep>, Vec<Kernel>) {
    let access: Vec<_> = steps.iter().map(|s| step_accesses(s, &kernels, loc)).collect();
    let keep_short = concurrent && !CHAIN_JOINS.on();
    let level = levels(&access);
    let mut taken = vec![false; steps.len()];
    let mut joined = vec![];
    for s in 0..steps.len() {
        if taken[s] {
            continue;
        }
        taken[s] = true;
        let mut group = vec![s];
        if matches!(&steps[s], DeviceStep::Launch(l) if can_start(l)) {
            // The steps that stay where they are, between the group and a candidate.
            let mut staying: Vec<usize> = vec![];
            for j in s + 1..steps.len().min(s + 1 + lookahead()) {
                if taken[j] {
                    continue;
                }
                let launches: Vec<&Launchable> = group.iter().map(|&g| launch_of(&steps, g)).collect();
                let joins = match &steps[j] {
                    DeviceStep::Launch(next) => {
                        can_join(loc, &kernels, &launches, next)
                            && staying.iter().all(|&i| independent(&access[i], &access[j]))
                            && !(keep_short && holds_up_a_waited_kernel(&steps, &kernels, &access, &level, &group, j))
                    }
                    DeviceStep::Gemm(_) | DeviceStep::GemmLt(_) => false,
                };
                if joins {
                    group.push(j);
                } else {
                    staying.push(j);
                }
            }
        }
        if group.len() < 2 {
            joined.push(steps[s].clone());
            continue;
        }
        for &g in &group {
            taken[g] = true;
        }
        let launches: Vec<Launchable> = group.iter().map(|&g| launch_of(&steps, g).clone()).collect();
        let names: Vec<String> = launches.iter().map(|l| l.kernel.clone()).collect();
        let sections: Vec<Kernel> = names
            .iter()
            .map(|n| kernels.iter().find(|k| k.name == *n).expect("every launch has its kernel").clone())
            .collect();
        let at = kernels.iter().position(|k| k.name == names[0]).expect("the group's first kernel");
        let (kernel, step) = join(sections, launches);
        kernels.retain(|k| !names.contains(&k.name));
        kernels.insert(at.min(kernels.len()), kernel);
        joined.push(step);
    }
    (joined, kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str, shared_floats: usize) -> (Kernel, Launchable) {
        let launch = Launch { grid: (10, 1), block: (256, 1), cluster: 1 };
        let body = vec![Stmt::If(
            Expr::Bool(true),
            vec![Stmt::SharedArray { ty: CType::Float, name: "tile".into(), len: shared_floats, align: 0 }],
            vec![],
        )];
        let k = Kernel::plain(name, vec![], vec![], body, launch);
        (k, Launchable { kernel: name.into(), args: vec![], launch })
    }

    #[test]
    fn joined_kernels_keep_within_the_static_shared_memory_limit() {
        let (a, la) = kernel("a", 6500);
        let (b, lb) = kernel("b", 6500);
        let (c, lc) = kernel("c", 5000);
        let kernels = vec![a, b, c];
        // 26 KB each: two of them would need 52 KB.
        assert!(!can_join(&[], &kernels, &[&la], &lb));
        assert!(can_join(&[], &kernels, &[&la], &lc));
    }

    fn clustered(name: &str, grid: u32, cluster: u32) -> (Kernel, Launchable) {
        let (mut k, mut l) = kernel(name, 10);
        k.launch = Launch { grid: (grid, 1), block: (256, 1), cluster };
        l.launch = k.launch;
        (k, l)
    }

    #[test]
    fn each_cluster_of_a_joined_kernel_lies_within_one_section() {
        let (a, la) = clustered("a", 8, 4);
        let (b, lb) = clustered("b", 3, 1);
        let (c, lc) = clustered("c", 8, 4);
        let (d, ld) = clustered("d", 6, 2);
        let kernels = vec![a.clone(), b.clone(), c, d];
        // One cluster size a kernel; a clustered launch after 3 blocks starts on the 4th (below),
        // or, as before (`KILN_CUDA_CLUSTERS_FIRST=1`), does not join.
        assert!(can_join(&[], &kernels, &[&la], &lb));
        assert!(can_join(&[], &kernels, &[&lb], &lc));
        assert!(!with_clusters_first(true, || can_join(&[], &kernels, &[&lb], &lc)));
        assert!(can_join(&[], &kernels, &[&la], &lc));
        assert!(!can_join(&[], &kernels, &[&la], &ld));
        // 8 + 3 blocks in whole clusters of 4: the last section's blocks end at 11, the grid at 12.
        let (joined, step) = join(vec![a, b], vec![la, lb]);
        let DeviceStep::Launch(launch) = step else { unreachable!("a kernel launch") };
        assert_eq!((launch.launch.grid, launch.launch.cluster), ((12, 1), 4));
        let mut source = String::new();
        super::super::print::kernel(&mut source, &joined);
        assert!(source.contains("__cluster_dims__(4, 1, 1)") && source.contains("blockIdx.x < 11"), "{source}");
        // After b's 3 blocks, longer-running, the cluster's first block is the 4th.
        let (b, lb) = with_macs(clustered("b", 3, 1), 512);
        let (c, lc) = clustered("c", 8, 4);
        let (joined, _) = join(vec![b, c], vec![lb, lc]);
        let ranges =
            ["  blocks [0, 3): b", "  blocks [3, 4): none (a cluster's first block next)", "  blocks [4, 12): c"];
        assert_eq!(block_ranges(&joined), ranges);
    }

    #[test]
    fn a_join_that_lowers_the_register_budget_never_needs_a_second_wave() {
        let budget = |name: &str, grid: u32, blocks: Option<u32>| {
            let (mut k, l) = clustered(name, grid, 1);
            k.min_blocks = blocks;
            (k, l)
        };
        let (chain, lc) = budget("k23_fused", 256, Some(3));
        let (wide, lw) = budget("k63_fused", 104, Some(2));
        let (small, ls) = budget("k27_fused", 16, Some(3));
        let (same, lm) = budget("k59_fused", 200, Some(3));
        let (light, ll) = budget("k60_sum", 400, None);
        let kernels = vec![chain, wide, small, same, light];
        // 360 blocks at two an SM would need more than 264 slots; the 16-block kernel takes it.
        assert!(!can_join(&[], &kernels, &[&lc], &lw));
        assert!(can_join(&[], &kernels, &[&ls], &lw));
        // Past a wave is allowed where the budget stays (and with no budget at all).
        assert!(can_join(&[], &kernels, &[&lc], &lm));
        assert!(can_join(&[], &kernels, &[&lc], &ll));
    }

    /// `(kernel, launch)` with its threads doing `macs` multiply-adds.
    fn with_macs((mut k, l): (Kernel, Launchable), macs: usize) -> (Kernel, Launchable) {
        k.macs_per_thread = macs;
        (k, l)
    }

    /// The joined kernel's comment lines that say which blocks run what.
    fn block_ranges(joined: &Kernel) -> Vec<&str> {
        joined.comments.iter().filter(|c| c.starts_with("  blocks")).map(|c| c.as_str()).collect()
    }

    #[test]
    fn the_sections_that_run_longest_take_the_first_blocks_clustered_ones_on_a_cluster_s_first() {
        let joined = |clusters_first| {
            let (mask, lm) = with_macs(clustered("k18_fused", 1024, 1), 0);
            let (sum, ls) = with_macs(clustered("k28_sum", 127, 1), 0);
            let (mut deep, ld) = with_macs(clustered("k32_fused", 64, 8), 2048);
            deep.body.push(decl(CType::Int, "tile_index", cast(CType::Int, Expr::Builtin(Builtin::BlockIdx))));
            let (shallow, lh) = with_macs(clustered("k40_fused", 32, 1), 512);
            let (deeper, lp) = with_macs(clustered("k44_fused", 13, 1), 4096);
            let kernels = vec![mask, sum, deep, shallow, deeper];
            with_clusters_first(clusters_first, || join(kernels, vec![lm, ls, ld, lh, lp])).0
        };
        // Named in step order; blocks: the most multiply-adds a thread first, the rest in step
        // order; the cluster starts on a cluster's first block, the blocks before it run nothing.
        let by_macs = joined(false);
        assert_eq!(by_macs.name, "k18_fused_and_k28_k32_k40_k44");
        assert_eq!(
            block_ranges(&by_macs),
            [
                "  blocks [0, 13): k44_fused",
                "  blocks [13, 16): none (a cluster's first block next)",
                "  blocks [16, 80): k32_fused",
                "  blocks [80, 112): k40_fused",
                "  blocks [112, 1136): k18_fused",
                "  blocks [1136, 1263): k28_sum",
                "  blocks [1263, 1264): none (the grid in whole clusters of 8)"
            ]
        );
        assert_eq!((by_macs.launch.grid, by_macs.launch.cluster, by_macs.macs_per_thread), ((1264, 1), 8, 4096));
        let mut source = String::new();
        super::super::print::kernel(&mut source, &by_macs);
        // The skipped blocks fall in a branch of their own; k32 reads its blocks from its first.
        assert!(source.contains("if ((int)blockIdx.x < 16) {\n        } else {"), "{source}");
        assert!(source.contains("const int tile_index = (int)((int)blockIdx.x - 16);"), "{source}");
        // As before: the cluster first, then the most multiply-adds a thread.
        assert_eq!(
            block_ranges(&joined(true)),
            [
                "  blocks [0, 64): k32_fused",
                "  blocks [64, 77): k44_fused",
                "  blocks [77, 109): k40_fused",
                "  blocks [109, 1133): k18_fused",
                "  blocks [1133, 1260): k28_sum",
                "  blocks [1260, 1264): none (the grid in whole clusters of 8)"
            ]
        );
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    /// A launch of 16 blocks reading buffers `reads` and writing `writes`, its threads doing
    /// `macs` multiply-adds.
    fn step(name: &str, reads: &[usize], writes: &[usize], macs: usize) -> (Kernel, DeviceStep) {
        let launch = Launch { grid: (16, 1), block: (256, 1), cluster: 1 };
        let param = |b: usize, kind| Param { ty: CType::Float, name: format!("b{b}"), kind };
        let params: Vec<Param> = reads
            .iter()
            .map(|&b| param(b, ParamKind::In))
            .chain(writes.iter().map(|&b| param(b, ParamKind::Out)))
            .collect();
        let args = reads.iter().chain(writes).map(|&b| KernelArg::Buf(b)).collect();
        let mut k = Kernel::plain(name, vec![], params, vec![], launch);
        k.macs_per_thread = macs;
        (k, DeviceStep::Launch(Launchable { kernel: name.into(), args, launch }))
    }

    fn names(steps: &[DeviceStep]) -> Vec<String> {
        steps.iter().map(|s| launch_of(std::slice::from_ref(s), 0).kernel.clone()).collect()
    }

    #[test]
    fn work_off_the_chain_does_not_hold_up_the_chains_kernels() {
        // A chain of four products (buffers 0 -> 1 -> 2 -> 3 -> 4, 256 multiply-adds a thread, the
        // last 1024), a deep weight gradient, a shallow one and a middling one of the first
        // product's output (4096, 128 and 512), and a bias gradient of it (no multiply-adds).
        let (kernels, steps): (Vec<Kernel>, Vec<DeviceStep>) = [
            step("k1_chain", &[0], &[1], 256),
            step("k2_chain", &[1], &[2], 256),
            step("k3_chain", &[2], &[3], 256),
            step("k4_chain", &[3], &[4], 1024),
            step("k5_deep", &[0, 1], &[5], 4096),
            step("k6_shallow", &[0, 1], &[6], 128),
            step("k7_sum", &[1], &[7], 0),
            step("k8_middling", &[0, 1], &[8], 512),
        ]
        .into_iter()
        .unzip();
        let loc: Vec<Location> = (0..9).map(Location::Alone).collect();
        // On one stream every launch joins the first kernel it can run beside (four sections at
        // most).
        let (one, _) = join_all(steps.clone(), kernels.clone(), &loc, false);
        assert_eq!(names(&one), ["k1_chain", "k2_chain_and_k5_k6_k7", "k3_chain_and_k8", "k4_chain"]);
        // On several: the deep and the middling gradient would make the second and third
        // products' kernels, which the next ones wait for, run longer; the shallow one and the
        // sum join the second. The last kernel ends the chain: the middling one, though shorter
        // than its product, could start two steps of the chain earlier. Those two run beside each
        // other on another stream, in a kernel nothing waits for.
        let (several, _) = join_all(steps.clone(), kernels.clone(), &loc, true);
        assert_eq!(names(&several), ["k1_chain", "k2_chain_and_k6_k7", "k3_chain", "k4_chain", "k5_deep_and_k8"]);
        // As before where asked.
        let (asked, _) = with_chain_joins(true, || join_all(steps, kernels, &loc, true));
        assert_eq!(names(&asked), names(&one));
    }
}
