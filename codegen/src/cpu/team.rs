//! The CPU backend's worker threads: a fixed team that runs the parts of one split step at a time.
//!
//! Why not rayon: a training step is a chain of short steps (tens of microseconds each at batch
//! 128), each split across the cores and joined before the next. Rayon's idle workers fall asleep
//! within microseconds, and waking one costs 10-20 us on these machines, as much as the step it
//! would share. The team's workers spin between jobs for a while (`SPIN`), so a job published during
//! a training loop starts on every core within a fraction of a microsecond; after that they park.
//!
//! Guarantees: the caller always takes part, and parts are claimed one at a time from a counter, so
//! a job finishes even if no worker wakes up (a slower job, never a wrong or stuck one). A claim
//! carries the job's epoch, so a late worker can never run a part of a finished job. One job runs
//! at a time: a caller that finds the team busy (another thread's job), or that is itself a worker,
//! runs all parts itself. A panic in a part is resumed in the caller.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);
/// The part index of a job being published: no part can be claimed until the job is in place.
const LOCKED: u64 = 0xffff_ffff;

/// One published job: `f(part)` for every part in [0, parts) (or, for a broadcast, once per thread).
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    broadcast: bool,
}

pub struct Team {
    workers: usize,
    /// The core left to callers while they run a step, when the workers are pinned.
    caller_cpu: Option<usize>,
    /// Whether a caller is pinned to `caller_cpu` now (one at a time: concurrent callers, such as
    /// tests on several threads, are not all crowded onto one core).
    pinned_caller: AtomicBool,
    /// The current job's epoch (high 32 bits) and next unclaimed part (low 32 bits).
    state: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    /// The current job's part count (kept here, not read from the job, which may be gone once all
    /// its parts are claimed).
    parts: AtomicUsize,
    /// Parts (or, for a broadcast, workers) not yet finished.
    remaining: AtomicUsize,
    panicked: AtomicBool,
    /// Held by the thread whose job runs.
    busy: Mutex<()>,
    sleepers: AtomicUsize,
    wake: (Mutex<()>, Condvar),
}

thread_local! {
    static IS_WORKER: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    /// The process's team: `KILN_NUM_THREADS` threads in all (else `RAYON_NUM_THREADS`, else one
    /// per core), the caller counting as one.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<&'static Team> = OnceLock::new();
        TEAM.get_or_init(|| {
            let from_env =
                |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
            let threads = from_env("KILN_NUM_THREADS")
                .or_else(|| from_env("RAYON_NUM_THREADS"))
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let cpus = allowed_cpus();
            let pinned = cpus.len() >= threads && threads > 1;
            let team: &'static Team = Box::leak(Box::new(Team {
                workers: threads - 1,
                caller_cpu: pinned.then(|| cpus[0]),
                pinned_caller: AtomicBool::new(false),
                state: AtomicU64::new(0),
                job: AtomicPtr::new(std::ptr::null_mut()),
                parts: AtomicUsize::new(0),
                remaining: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
                busy: Mutex::new(()),
                sleepers: AtomicUsize::new(0),
                wake: (Mutex::new(()), Condvar::new()),
            }));
            for i in 0..team.workers {
                // Worker i keeps to the (i+1)-th allowed core, so a spinning worker never shares a
                // core with another worker, nor with a caller inside `CallerPin`.
                let cpu = pinned.then(|| cpus[i + 1]);
                std::thread::Builder::new()
                    .name(format!("kiln-worker-{i}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            pin_to(cpu);
                        }
                        team.work()
                    })
                    .expect("spawning a kiln worker thread");
            }
            team
        })
    }

    /// Keeps the calling thread on the core the workers leave free until the guard is dropped
    /// (then its own affinity is restored). A step that splits its work holds one: unpinned, the
    /// caller can land on a worker's core (seen here), where the two share it for milliseconds
    /// before the scheduler moves one.
    pub fn pin_caller(&'static self) -> CallerPin {
        let Some(cpu) = self.caller_cpu else { return CallerPin { team: None, saved: None } };
        if self.pinned_caller.compare_exchange(false, true, Acquire, Relaxed).is_err() {
            return CallerPin { team: None, saved: None };
        }
        let saved = current_affinity();
        if saved.is_some() {
            pin_to(cpu);
        }
        CallerPin { team: Some(self), saved }
    }

    /// Threads a job can use, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(part)` for every part in [0, parts), on as many threads as are free; returns when
    /// all have finished.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if parts <= 1 || self.workers == 0 || IS_WORKER.get() {
            return (0..parts).for_each(f);
        }
        let Ok(_busy) = self.busy.try_lock() else { return (0..parts).for_each(f) };
        self.publish(&Job { f, parts, broadcast: false }, parts);
        self.claim_parts(self.state.load(Acquire) >> 32);
        self.finish();
    }

    /// Runs `f` once on every thread of the team (the caller and each worker); for per-thread
    /// setup such as packing buffers.
    pub fn broadcast(&self, f: &(dyn Fn() + Sync)) {
        let each = |_part: usize| f();
        f();
        if self.workers == 0 || IS_WORKER.get() {
            return;
        }
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        self.publish(&Job { f: &each, parts: self.workers, broadcast: true }, self.workers);
        self.finish();
    }

    fn publish(&self, job: &Job, remaining: usize) {
        self.remaining.store(remaining, Relaxed);
        self.panicked.store(false, Relaxed);
        let epoch = (self.state.load(Relaxed) >> 32) + 1;
        // New epoch first, locked: a worker that still holds the old state's value and reads the
        // new job pointer fails its claim, because the state has changed under it.
        self.state.store(epoch << 32 | LOCKED, SeqCst);
        self.parts.store(job.parts, SeqCst);
        // The job lives on the caller's stack until `finish` has seen every part done.
        self.job.store(job as *const Job as *mut Job<'static>, SeqCst);
        // SeqCst pairs with the sleepers' count: either a parking worker sees this epoch, or this
        // thread sees it parking and wakes it.
        self.state.store(epoch << 32, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _g = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.1.notify_all();
        }
    }

    fn finish(&self) {
        while self.remaining.load(Acquire) != 0 {
            std::hint::spin_loop();
        }
        if self.panicked.load(Relaxed) {
            panic!("a part of a parallel kiln step panicked");
        }
    }

    /// Claims and runs parts of the job of `epoch` until none is left (one part, for a broadcast:
    /// it has one per worker).
    fn claim_parts(&self, epoch: u64) {
        loop {
            let cur = self.state.load(Acquire);
            if cur >> 32 != epoch {
                return;
            }
            let next = cur & 0xffff_ffff;
            if next == LOCKED {
                std::hint::spin_loop();
                continue;
            }
            // Part count and job pointer as of `cur`, if the claim below succeeds: the state was
            // `cur` until then, and a new job locks the state before it stores either.
            let (parts, job) = (self.parts.load(SeqCst), self.job.load(SeqCst));
            if next as usize >= parts {
                return;
            }
            if self.state.compare_exchange_weak(cur, cur + 1, SeqCst, Relaxed).is_err() {
                continue;
            }
            // SAFETY: this epoch's job (see above), alive until its claimed part has run.
            let job = unsafe { &*job };
            self.run_part(job, next as usize);
            if job.broadcast {
                return;
            }
        }
    }

    fn run_part(&self, job: &Job, part: usize) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.f)(part))).is_err() {
            self.panicked.store(true, Relaxed);
        }
        self.remaining.fetch_sub(1, Release);
    }

    fn work(&self) {
        IS_WORKER.set(true);
        let mut seen = 0;
        loop {
            seen = self.wait_for_job(seen);
            self.claim_parts(seen);
        }
    }

    /// Spins, then parks, until a job newer than `seen` is published; returns its epoch.
    fn wait_for_job(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = self.state.load(Acquire) >> 32;
            if epoch != seen {
                return epoch;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins & 1023 == 0 && start.elapsed() > SPIN {
                let g = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
                self.sleepers.fetch_add(1, SeqCst);
                let g = if self.state.load(SeqCst) >> 32 == seen {
                    self.wake.1.wait(g).unwrap_or_else(|e| e.into_inner())
                } else {
                    g
                };
                self.sleepers.fetch_sub(1, SeqCst);
                drop(g);
            }
        }
    }
}

/// Restores the caller's affinity when dropped (see `Team::pin_caller`).
pub struct CallerPin {
    team: Option<&'static Team>,
    saved: Option<Affinity>,
}

impl Drop for CallerPin {
    fn drop(&mut self) {
        if let Some(set) = &self.saved {
            set_affinity(set);
        }
        if let Some(team) = self.team {
            team.pinned_caller.store(false, Release);
        }
    }
}

#[cfg(target_os = "linux")]
type Affinity = libc::cpu_set_t;
#[cfg(not(target_os = "linux"))]
type Affinity = ();

/// The calling thread's allowed cores.
#[cfg(target_os = "linux")]
fn current_affinity() -> Option<Affinity> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and the call writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0).then_some(set)
    }
}

#[cfg(target_os = "linux")]
fn set_affinity(set: &Affinity) {
    // SAFETY: a valid set; a failure leaves the affinity as it was.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
}

/// The cores this thread may run on.
#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    let Some(set) = current_affinity() else { return vec![] };
    // SAFETY: reads a valid set.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    vec![]
}

#[cfg(not(target_os = "linux"))]
fn current_affinity() -> Option<Affinity> {
    None
}

#[cfg(not(target_os = "linux"))]
fn set_affinity(_set: &Affinity) {}

/// Keeps the calling thread on one core (best effort: a failure leaves it unpinned).
#[cfg(target_os = "linux")]
fn pin_to(cpu: usize) {
    // SAFETY: as above; the set holds one valid core index.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_to(_cpu: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_across_many_jobs_and_callers() {
        let team = Team::global();
        let callers: Vec<_> = (0..3)
            .map(|c| {
                std::thread::spawn(move || {
                    for round in 0..300 {
                        let parts = 1 + (round + c) % 7;
                        let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                        team.run(parts, &|p| {
                            hits[p].fetch_add(1, Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
                        if round % 50 == 0 {
                            // long enough for the workers to park
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    }

    #[test]
    fn broadcast_reaches_every_thread() {
        let team = Team::global();
        let names = Mutex::new(std::collections::HashSet::new());
        team.broadcast(&|| {
            names.lock().unwrap().insert(std::thread::current().id());
        });
        assert_eq!(names.lock().unwrap().len(), team.threads());
    }
}
