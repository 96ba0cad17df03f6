//! `Function::autotune`: the CUDA backend's choices for one step, timed on the card at hand. Each
//! float product the backend may tile is tried as cuBLAS and in each tiling (`kiln_codegen::cuda::
//! autotune` holds the search and its cache), the whole step timed for each, and the function then
//! runs the fastest. Tuning calls the function many times, so it saves the values of the shared
//! variables the function touches first and puts them back after (the weights a training step
//! updates, the states of its random streams): a tuned function starts where the untuned one was.
//! What it finds is kept in kiln's cache folder (`tuned/`), keyed by the step's code and the card,
//! so the next run of the program finds it without timing anything.

use crate::function::{Device, Function};
use kiln_codegen::cuda::autotune::{self, Outcome, Setting, Space};
use kiln_codegen::cuda::{ProductKey, TileTable};
use kiln_codegen::Executable;
use kiln_ir::{Error, Result, Tensor};
use std::time::Instant;

/// How `Function::autotune` searches.
#[derive(Clone, Debug)]
pub struct AutotuneOptions {
    /// Each setting is timed over at least this many seconds of calls...
    pub seconds_per_setting: f64,
    /// ...and at least this many calls (after two that are not timed).
    pub min_calls: usize,
    /// No further candidate is tried after this many seconds (the best so far is kept).
    pub budget_seconds: f64,
    /// What is tried: the tilings of each product (`autotune::default_candidates`), then for the
    /// whole step programmatic dependent launch, sliced tiles as thread block clusters (compute
    /// capability 9.0 or newer), cuBLAS's products through cuBLASLt or not, row tails or not,
    /// joined kernels' sections longest first or in step order, launches that would hold up a
    /// kernel the step waits for joining it or not, slabs copied by quads or by words, unsliced
    /// tiles' slabs deep or not, the tiles kiln picks on tensor cores or by FMAs, every slab loop
    /// in passes of turns or in single turns, each number of streams (1 to 3), the two bounds and
    /// the joins' reach.
    pub space: Space,
    /// Read the result from the cache folder where a run before found it, and keep it there
    /// (unless the budget ran out before every candidate was tried).
    pub cache: bool,
    /// The cache folder (`None`: `tuned` in kiln's cache folder, `$KILN_CACHE_DIR/tuned`, else
    /// `~/.cache/kiln/tuned`).
    pub cache_folder: Option<std::path::PathBuf>,
}

impl Default for AutotuneOptions {
    fn default() -> Self {
        AutotuneOptions {
            seconds_per_setting: 0.03,
            min_calls: 5,
            budget_seconds: 300.0,
            space: Space::default(),
            cache: true,
            cache_folder: None,
        }
    }
}

/// What `Function::autotune` found; printed, a few lines a person can read.
#[derive(Clone, Debug)]
pub struct AutotuneReport {
    /// The card (its name and NVRTC target), or `cuda-emulator`.
    pub device: String,
    /// The tunable products of the step, by kernel name, and their shape and layout.
    pub products: Vec<(String, ProductKey)>,
    /// What the search found, with its figures (from the cache: only `setting` is meaningful).
    pub outcome: Outcome,
    /// Seconds the autotune took in all.
    pub seconds: f64,
    /// The cache entry it was read from, or written to (`None`: not cached).
    pub cache_entry: Option<std::path::PathBuf>,
    /// Whether the setting was read from the cache rather than searched for.
    pub from_cache: bool,
}

impl AutotuneReport {
    /// The products' choices as a tile table (`KILN_CUDA_TILES` reads its text).
    pub fn table(&self) -> &TileTable {
        &self.outcome.setting.table
    }
}

impl std::fmt::Display for AutotuneReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.outcome;
        if self.from_cache {
            writeln!(f, "autotuned on {}: read from the cache in {:.1} ms", self.device, self.seconds * 1e3)?;
        } else {
            // Where nothing beat kiln's own choices, its two timings differ by noise alone: a
            // ratio of them would read as a gain or a loss that tuning did not make.
            let outcome = if o.setting == Setting::default() {
                format!(
                    "{:.4} ms a step with kiln's own choices ({:.4} ms timed again), none beaten",
                    o.before_ms, o.after_ms
                )
            } else {
                format!(
                    "{:.4} ms a step with kiln's own choices, {:.4} ms tuned ({:.2}x)",
                    o.before_ms,
                    o.after_ms,
                    o.before_ms / o.after_ms
                )
            };
            writeln!(
                f,
                "autotuned on {}: {outcome}; \
                 {} settings timed, {} with the same code passed over, {} failed, in {:.1} s{}",
                self.device,
                o.timed,
                o.same_code,
                o.failed.len(),
                self.seconds,
                if o.out_of_budget { " (out of budget: not every candidate was tried)" } else { "" }
            )?;
        }
        for (kernel, key) in &self.products {
            let choice = o.setting.table.entries.get(key).copied().unwrap_or_default();
            writeln!(f, "  {kernel:<16} {:<18} {}", key.to_string(), choice.label().unwrap_or_default())?;
        }
        // As in the cache entry: `kiln` where kiln's own value (or the environment's) won.
        writeln!(f, "  {}", o.setting.knobs())?;
        if let Some(path) = &self.cache_entry {
            writeln!(f, "  cache entry {}", path.display())?;
        }
        Ok(())
    }
}

/// The card a function of `device` runs on, as the cache names it, and its architecture (what the
/// code generated for it follows; the emulator's is the one code is checked for).
fn device_label(device: Device) -> Result<(String, &'static str)> {
    match device {
        Device::CudaEmulator => Ok(("cuda-emulator".into(), kiln_codegen::cuda::nvrtc::CHECK_ARCH)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let gpu = kiln_codegen::cuda::runtime::Gpu::get(ordinal)?;
            Ok((format!("{} ({})", gpu.name, gpu.arch), gpu.arch))
        }
        other => Err(Error::Invalid(format!(
            "autotune tunes the CUDA backend's choices (Device::Cuda or Device::CudaEmulator); \
             this function runs on {other:?}"
        ))),
    }
}

impl Function {
    /// Times the CUDA backend's ways of computing this step on its card, for calls with these
    /// arguments' shapes, and from then on runs the fastest: each float product that the backend
    /// may tile as cuBLAS or in each tiling of `opts.space`, then the step's knobs (dependent
    /// launch, clusters, cuBLASLt, row tails, longest-first sections, chain joins, streams, two
    /// size bounds, the joins' reach; see `kiln_codegen::cuda::autotune`). The values of the
    /// shared variables are as before the call when it returns. Later specializations (other
    /// shapes) keep the tuned choices for the products they share. An `Err` for a function that
    /// does not run on a CUDA device, or where the step fails to run as compiled at first.
    pub fn autotune(&mut self, args: &[Tensor], opts: &AutotuneOptions) -> Result<AutotuneReport> {
        let start = Instant::now();
        let (device, arch) = device_label(self.device())?;
        let shapes = self.signature(args)?;
        let products = kiln_codegen::cuda::program_products(&self.program, &shapes)?;
        let code_of = |s: &Setting| {
            let opts = s.compile_options();
            kiln_codegen::cuda::with_target_arch(arch, || {
                kiln_codegen::cuda::with_compile_options(&opts, || {
                    kiln_codegen::cuda::program_source(&self.program, &shapes)
                })
            })
        };
        let key = autotune::cache_key(&code_of(&Setting::default())?, &device, &opts.space);
        let folder = opts.cache_folder.clone().or_else(autotune::default_cache_folder).filter(|_| opts.cache);
        let cached = folder.as_deref().and_then(|folder| autotune::read_cached(folder, &key));
        let (outcome, from_cache) = match cached {
            Some(setting) => (Outcome::unsearched(setting), true),
            None => {
                let keys: Vec<ProductKey> = products.iter().map(|p| p.1).collect();
                let saved = self.save_shared()?;
                let found = autotune::search(
                    &keys,
                    &opts.space,
                    opts.budget_seconds,
                    code_of,
                    |round: &[Setting]| self.precompile(round, &shapes),
                    |s: &Setting| self.time_setting(s, args, &shapes, opts),
                );
                self.restore_shared(saved);
                (found?, false)
            }
        };
        let mut exe = self.device().backend().compile(&self.program, &outcome.setting.compile_options())?;
        exe.prepare(&shapes)?;
        self.exe = exe;
        let mut report = AutotuneReport { device, products, outcome, seconds: 0.0, cache_entry: None, from_cache };
        // A search cut short by its budget is not kept: a run with more time should search again.
        if let Some(folder) = folder.as_ref().filter(|_| !report.outcome.out_of_budget) {
            report.cache_entry = if from_cache {
                Some(autotune::cache_path(folder, &key))
            } else {
                let heading = format!(
                    "kiln autotune of a step on {}: {:.4} ms with kiln's own choices, {:.4} ms so",
                    report.device, report.outcome.before_ms, report.outcome.after_ms
                );
                // A cache that cannot be written costs the next run a search, nothing more.
                autotune::write_cached(folder, &key, &report.outcome.setting, &heading).ok()
            };
        }
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Compiles the step under each of `settings` on every core, into the backend's caches, so that
    /// timing them one by one finds them compiled. A setting that fails here fails again when it
    /// is timed, and is reported then.
    fn precompile(&self, settings: &[Setting], shapes: &[Vec<usize>]) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let next = AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(settings.len());
        let (device, program) = (self.device(), &self.program);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let backend = device.backend();
                    while let Some(s) = settings.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let _ = backend.precompile(program, shapes, &s.compile_options());
                    }
                });
            }
        });
    }

    /// Median milliseconds per call of the step compiled with `setting`.
    fn time_setting(
        &self,
        setting: &Setting,
        args: &[Tensor],
        shapes: &[Vec<usize>],
        opts: &AutotuneOptions,
    ) -> Result<f64> {
        let mut exe: Box<dyn Executable> =
            self.device().backend().compile(&self.program, &setting.compile_options())?;
        exe.prepare(shapes)?;
        // Left out: a first call can pay for more than the step (cuBLAS loads its kernels).
        for _ in 0..2 {
            self.call_on(&mut *exe, args)?;
        }
        let mut times = vec![];
        let start = Instant::now();
        while times.len() < opts.min_calls.max(1) || start.elapsed().as_secs_f64() < opts.seconds_per_setting {
            let t = Instant::now();
            self.call_on(&mut *exe, args)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// The host values of the shared variables this function touches.
    fn save_shared(&self) -> Result<Vec<Tensor>> {
        let mut st = self.graph.state.borrow_mut();
        self.shared
            .iter()
            .map(|id| Ok(st.shared.get_mut(id).expect("variables live in their graph").host()?.clone()))
            .collect()
    }

    /// Puts back what `save_shared` saved.
    fn restore_shared(&self, saved: Vec<Tensor>) {
        let mut st = self.graph.state.borrow_mut();
        for (id, value) in self.shared.iter().zip(saved) {
            st.shared.get_mut(id).expect("variables live in their graph").set(value);
        }
    }
}
