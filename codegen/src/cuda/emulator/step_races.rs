//! The race check between steps: on a GPU with several streams (`KILN_CUDA_STREAMS`), two steps
//! that no chain of the program's dependencies orders may run at once. Under the race check the
//! emulator records which bytes each step actually read and wrote (the shim's per-element records
//! of each launch, a cuBLAS product's whole operands), and two unordered steps that touch one byte,
//! one of them writing, are an error naming both: a dependency the scheduler missed, which the
//! emulator's one-at-a-time order would otherwise hide whenever it happened to run them the right
//! way round.

use kiln_ir::{Error, Result};
use std::ffi::c_void;

/// Bytes `[lo, hi)` of host memory that a step wrote (or only read), and the step's name for the
/// buffer they lie in.
#[derive(Clone, Debug)]
pub(super) struct Touch {
    pub lo: usize,
    pub hi: usize,
    pub write: bool,
    pub buffer: String,
}

/// The shim's `kiln_emu_race_runs`: what the last launch did to the buffer at an address.
pub(super) type RaceRuns = unsafe extern "C" fn(*const c_void, *mut usize, usize) -> usize;

/// Appends to `out` what the last launch did to the buffer at `at` (named `buffer` by its kernel).
pub(super) fn launch_touched(runs: RaceRuns, at: *mut c_void, buffer: &str, out: &mut Vec<Touch>) {
    let mut triples = vec![0usize; 3 * 16];
    loop {
        // SAFETY: room for `len / 3` triples, as the shim is told.
        let n = unsafe { runs(at, triples.as_mut_ptr(), triples.len() / 3) };
        if 3 * n <= triples.len() {
            out.extend(triples[..3 * n].chunks(3).map(|r| Touch {
                lo: at as usize + r[0],
                hi: at as usize + r[1],
                write: r[2] == 2,
                buffer: buffer.to_string(),
            }));
            return;
        }
        triples.resize(3 * n, 0);
    }
}

/// An error if two steps that `deps` leaves unordered (`deps[i]`: the steps step `i` waits for)
/// touched one byte, one of them writing.
pub(super) fn check(deps: &[Vec<usize>], names: &[String], touched: &[Vec<Touch>]) -> Result<()> {
    let n = deps.len();
    // after[i][j]: step i starts after step j has finished, through some chain of dependencies.
    let mut after = vec![vec![false; n]; n];
    for i in 0..n {
        let mut stack = deps[i].clone();
        while let Some(d) = stack.pop() {
            if !after[i][d] {
                after[i][d] = true;
                stack.extend(&deps[d]);
            }
        }
    }
    for i in 0..n {
        for j in (0..i).filter(|&j| !after[i][j] && !after[j][i]) {
            for a in &touched[j] {
                if let Some(b) = touched[i].iter().find(|b| (a.write || b.write) && a.lo < b.hi && b.lo < a.hi) {
                    let (first, second) = if a.write { ((j, a), (i, b)) } else { ((i, b), (j, a)) };
                    let verb = if second.1.write { "writes" } else { "reads" };
                    return Err(Error::Invalid(format!(
                        "emulated steps {} and {} have no dependency between them, yet {} writes memory that {} {} \
                         ({} bytes of its `{}`, its `{}`): on several streams a GPU may run them at once",
                        names[j],
                        names[i],
                        names[first.0],
                        names[second.0],
                        verb,
                        a.hi.min(b.hi) - a.lo.max(b.lo),
                        first.1.buffer,
                        second.1.buffer
                    )));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(lo: usize, hi: usize, write: bool) -> Touch {
        Touch { lo, hi, write, buffer: "x".into() }
    }

    #[test]
    fn unordered_steps_may_share_what_they_only_read_but_not_what_one_writes() {
        let names: Vec<String> = ["k0", "k1", "k2"].iter().map(|s| s.to_string()).collect();
        // k0 writes [0, 8); k1 reads [0, 4); k2 reads [4, 8) and writes [8, 12).
        let touched =
            vec![vec![touch(0, 8, true)], vec![touch(0, 4, false)], vec![touch(4, 8, false), touch(8, 12, true)]];
        // Both readers wait for k0 (k2 through k1): no race.
        assert!(check(&[vec![], vec![0], vec![1]], &names, &touched).is_ok());
        // k2 waits for nothing: it reads what k0 writes, unordered.
        let e = check(&[vec![], vec![0], vec![]], &names, &touched).unwrap_err().to_string();
        assert!(
            e.contains("steps k0 and k2 have no dependency") && e.contains("k0 writes memory that k2 reads"),
            "{e}"
        );
        // Two readers of one byte need no order between them.
        let readers = vec![vec![touch(0, 4, false)], vec![touch(0, 4, false)], vec![]];
        assert!(check(&[vec![], vec![], vec![]], &names, &readers).is_ok());
    }
}
