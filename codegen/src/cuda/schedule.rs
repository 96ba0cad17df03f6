//! The step's dependency graph, and how its steps spread over streams. Step `i` depends on an
//! earlier step `j` when `j` writes memory `i` reads or writes, or reads memory `i` writes (memory
//! compared by physical location: the memory plan reuses slots, so a later temporary can overwrite
//! what an earlier step still reads). Steps that do not depend on each other may run at the same
//! time: the runtime can issue them on several streams (`KILN_CUDA_STREAMS`), each waiting only for
//! what it depends on on the other streams, and a CUDA graph captured from those streams keeps
//! exactly those edges. The CUDA emulator runs steps in an order far from the program's (the latest
//! ready step first), so a dependency missing here makes its tests fail.

use super::ast::Kernel;
use super::emit::DeviceStep;
use super::group::Location;
use super::side::{independent, step_accesses};
use crate::kernel::{step_reads, step_writes, BufKind, KernelProgram, Step};

/// For each step, the earlier steps it depends on.
pub(super) fn dependencies(steps: &[DeviceStep], kernels: &[Kernel], loc: &[Location]) -> Vec<Vec<usize>> {
    let access: Vec<_> = steps.iter().map(|s| step_accesses(s, kernels, loc)).collect();
    (0..steps.len()).map(|i| (0..i).filter(|&j| !independent(&access[j], &access[i])).collect()).collect()
}

/// Moves each reduction whose result only the caller reads (a returned output, such as a loss's
/// mean) past the loop kernels after it, up to the next product (or other non-loop step), when
/// none of them writes what it reads: it then no longer stands between kernels that can be joined
/// (the loss and its gradient become one pass per row), and it stays among the tiny kernels it
/// can share a single-block run with. Before memory planning, so buffers are compared as buffers.
pub fn sink_unread_results(kp: &mut KernelProgram) {
    let returned = |kp: &KernelProgram, s: &Step| match s {
        Step::Loop(k) => {
            k.reduce.is_some() && kp.outputs.contains(&k.out.buf) && kp.buffers[k.out.buf].kind == BufKind::Temp
        }
        _ => false,
    };
    let mut i = 0;
    while i < kp.steps.len() {
        if !returned(kp, &kp.steps[i]) {
            i += 1;
            continue;
        }
        let Step::Loop(k) = &kp.steps[i] else { unreachable!("checked above") };
        let (out, reads): (usize, Vec<usize>) = (k.out.buf, k.inputs.iter().map(|v| v.buf).collect());
        // The loop kernels after it that it can move past, up to the next product.
        let mut to = i;
        for s in &kp.steps[i + 1..] {
            let (r, w) = (step_reads(s), step_writes(s));
            let independent = !r.contains(&out) && !w.contains(&out) && !w.iter().any(|b| reads.contains(b));
            if !matches!(s, Step::Loop(_)) || !independent {
                break;
            }
            to += 1;
        }
        // Only past other work (moving past other such reductions would only reorder them).
        if kp.steps[i + 1..=to].iter().any(|s| !returned(kp, s)) {
            let step = kp.steps.remove(i);
            kp.steps.insert(to, step);
        } else {
            i += 1;
        }
    }
}

/// A topological order of the steps that takes the latest ready step first: as far from program
/// order as the dependencies allow.
pub fn latest_first_order(deps: &[Vec<usize>]) -> Vec<usize> {
    let n = deps.len();
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next =
            (0..n).rev().find(|&i| !done[i] && deps[i].iter().all(|&d| done[d])).expect("dependencies point back");
        done[next] = true;
        order.push(next);
    }
    order
}

/// Which stream runs each step, in which order steps are issued, and the waits that order steps
/// across streams.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub streams: usize,
    /// The order steps are issued in: program order on one stream; on several, each step as soon
    /// as what it depends on could be done (longest dependency chain first), so that a weight
    /// gradient is issued beside the rest of the backward pass rather than after it.
    pub order: Vec<usize>,
    pub stream: Vec<usize>,
    /// For each step, the steps on other streams whose completion it waits for (one per stream:
    /// the latest it needs there).
    pub waits: Vec<Vec<usize>>,
    /// Whether some later step waits for this one (an event is recorded after it).
    pub recorded: Vec<bool>,
}

/// Spreads the steps over at most `streams` streams. Steps are taken in issue order (`Schedule::
/// order`); a step goes on the stream whose last step is its latest dependency (continuing that
/// chain), else on a stream whose last step it depends on, else on the stream that has been idle
/// longest; it then waits, on each other stream, for the latest step it depends on there that its
/// stream has not already waited for (directly or through another wait).
pub fn schedule(deps: &[Vec<usize>], streams: usize) -> Schedule {
    let (n, k) = (deps.len(), streams.max(1));
    let order: Vec<usize> = if k == 1 {
        (0..n).collect()
    } else {
        let mut level = vec![0usize; n];
        for i in 0..n {
            level[i] = deps[i].iter().map(|&d| level[d] + 1).max().unwrap_or(0);
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (level[i], i));
        order
    };
    // Positions in issue order; dependencies always point to earlier positions.
    let mut pos = vec![0; n];
    for (p, &i) in order.iter().enumerate() {
        pos[i] = p;
    }
    let mut stream = vec![0; n];
    let mut waits = vec![vec![]; n];
    let mut recorded = vec![false; n];
    // tail[s]: position of the last step issued on s; seen[s][t]: the latest position of stream t
    // that s has waited for; clock[p]: what the stream of position p had seen then.
    let mut tail: Vec<Option<usize>> = vec![None; k];
    let mut seen: Vec<Vec<Option<usize>>> = vec![vec![None; k]; k];
    let mut clock: Vec<Vec<Option<usize>>> = Vec::with_capacity(n);
    for (p, &i) in order.iter().enumerate() {
        let dep_pos: Vec<usize> = deps[i].iter().map(|&d| pos[d]).collect();
        let latest = dep_pos.iter().max().copied();
        let s = (0..k)
            .find(|&s| latest.is_some() && tail[s] == latest)
            .or_else(|| (0..k).filter(|&s| tail[s].is_some_and(|t| dep_pos.contains(&t))).max_by_key(|&s| tail[s]))
            .unwrap_or_else(|| (0..k).min_by_key(|&s| tail[s].map_or(-1, |t| t as i64)).expect("at least one stream"));
        for t in (0..k).filter(|&t| t != s) {
            let need = dep_pos.iter().copied().filter(|&q| stream[order[q]] == t).max();
            if let Some(q) = need {
                if seen[s][t].is_none_or(|w| w < q) {
                    waits[i].push(order[q]);
                    recorded[order[q]] = true;
                    for u in 0..k {
                        seen[s][u] = seen[s][u].max(clock[q][u]);
                    }
                }
            }
        }
        stream[i] = s;
        tail[s] = Some(p);
        seen[s][s] = Some(p);
        clock.push(seen[s].clone());
    }
    Schedule { streams: k, order, stream, waits, recorded }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every dependency is met, issuing in the schedule's order: on the same stream earlier, or
    /// seen through the waits.
    fn respects(deps: &[Vec<usize>], s: &Schedule) -> bool {
        let n = deps.len();
        let mut pos = vec![0; n];
        for (p, &i) in s.order.iter().enumerate() {
            pos[i] = p;
        }
        let mut seen: Vec<Vec<Option<usize>>> = vec![vec![None; s.streams]; s.streams];
        let mut clock: Vec<Vec<Option<usize>>> = vec![];
        for (p, &i) in s.order.iter().enumerate() {
            let st = s.stream[i];
            for &w in &s.waits[i] {
                let c = clock[pos[w]].clone();
                for u in 0..s.streams {
                    seen[st][u] = seen[st][u].max(c[u]);
                }
            }
            for &d in &deps[i] {
                if pos[d] >= p || seen[st][s.stream[d]].is_none_or(|x| x < pos[d]) {
                    return false;
                }
            }
            seen[st][st] = Some(p);
            clock.push(seen[st].clone());
        }
        true
    }

    #[test]
    fn a_chain_stays_on_one_stream_without_waits() {
        let deps = vec![vec![], vec![0], vec![1], vec![2]];
        let s = schedule(&deps, 2);
        assert_eq!(s.stream, vec![0, 0, 0, 0]);
        assert!(s.waits.iter().all(|w| w.is_empty()));
        assert!(respects(&deps, &s));
    }

    #[test]
    fn a_branch_runs_beside_the_chain_and_joins_it() {
        // 0 -> 1 -> 2 -> 3 (the input gradients), 1 -> 4 -> 5 (a weight gradient and its update),
        // and 6 needs both chains' ends.
        let deps = vec![vec![], vec![0], vec![1], vec![2], vec![1], vec![4], vec![3, 5]];
        let s = schedule(&deps, 2);
        assert_eq!(s.stream[..4], [0, 0, 0, 0]);
        assert_eq!((s.stream[4], s.stream[5]), (1, 1));
        assert_eq!(s.waits[4], vec![1]);
        assert!(respects(&deps, &s));
        // One stream: program order, no waits.
        let one = schedule(&deps, 1);
        assert!(one.stream.iter().all(|&x| x == 0) && one.waits.iter().all(|w| w.is_empty()));
    }

    #[test]
    fn waits_already_seen_through_another_wait_are_left_out() {
        // 2 waits for 1 (stream 1), which had waited for 0... 3 needs 0 and 2 only.
        let deps = vec![vec![], vec![], vec![0, 1], vec![0, 2]];
        let s = schedule(&deps, 2);
        assert!(respects(&deps, &s));
        let total: usize = s.waits.iter().map(|w| w.len()).sum();
        assert!(total <= 1, "{s:?}");
    }

    #[test]
    fn a_step_ready_early_is_issued_early() {
        // 0 -> 1 -> 2 -> 3 -> 4 is the chain; 5 needs only 0: issued second, beside the chain.
        let deps = vec![vec![], vec![0], vec![1], vec![2], vec![3], vec![0]];
        let s = schedule(&deps, 2);
        assert_eq!(s.order, vec![0, 1, 5, 2, 3, 4]);
        assert_ne!(s.stream[5], s.stream[1]);
        assert!(respects(&deps, &s));
    }

    #[test]
    fn random_graphs_on_one_to_four_streams_keep_every_dependency() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..300 {
            let n = 1 + next(40) as usize;
            let deps: Vec<Vec<usize>> = (0..n).map(|i| (0..i).filter(|_| next(100) < 12).collect()).collect();
            for k in 1..=4 {
                let s = schedule(&deps, k);
                assert!(respects(&deps, &s), "{deps:?} on {k} streams: {s:?}");
                let mut sorted = s.order.clone();
                sorted.sort();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>());
                assert!(s.stream.iter().all(|&t| t < k));
            }
            let order = latest_first_order(&deps);
            let mut done = vec![false; n];
            for i in order {
                assert!(deps[i].iter().all(|&d| done[d]));
                done[i] = true;
            }
        }
    }

    #[test]
    fn latest_first_respects_dependencies() {
        let deps = vec![vec![], vec![0], vec![], vec![1, 2], vec![]];
        let order = latest_first_order(&deps);
        assert_eq!(order, vec![4, 2, 0, 1, 3]);
    }
}
