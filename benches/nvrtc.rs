//! NVRTC compile-time benchmark (needs libnvrtc, not a GPU): for each standard workload, a cold
//! compile (no cache) of its step's CUDA C for an H100 (`sm_90`: machine code, as the runtime asks)
//! as one compilation unit, and as the CUDA backend compiles it: cut into units compiled on threads
//! of their own; and the units compiled to PTX only (`compute_90`: what the driver would then
//! compile, one module after another, as it loads them). Medians of `--runs` (default 3),
//! milliseconds. (Loading a compiled step from the disk cache is timed by the step benchmark's
//! compile column on a GPU.)
//!
//! `cargo bench --bench nvrtc [-- --runs N]`

use kiln::workloads::{build, NAMES};
use kiln::Device;
use kiln_codegen::cuda::nvrtc;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn millis(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    let mut runs = 3;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => runs = it.next().and_then(|s| s.parse().ok()).unwrap_or(runs),
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2)
            }
        }
    }
    if !nvrtc::available() {
        println!("skipped: {}", nvrtc::missing_reason());
        return;
    }
    // NVRTC's first call in a process loads and sets it up: not a step's cost.
    let _ = nvrtc::compile_uncached("extern \"C\" __global__ void warm(float* x) { x[0] = 1.0f; }", nvrtc::CHECK_ARCH);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("NVRTC cold compile of a training step, ms (median of {runs}; {threads} hardware threads)");
    println!("{:<16} {:>8} {:>10} {:>10} {:>14}", "workload", "kernels", "one unit", "in parts", "PTX in parts");
    for name in NAMES {
        let w = build(name, Device::Reference).unwrap_or_else(|e| panic!("{name}: {e}"));
        let source = w.step.cuda_source(&w.args).unwrap_or_else(|e| panic!("{name}: {e}"));
        let module = w.step.cuda_module(&w.args).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (mut whole, mut parts, mut ptx) = (vec![], vec![], vec![]);
        for _ in 0..runs {
            whole.push(millis(|| {
                nvrtc::compile_uncached(&source, nvrtc::CHECK_ARCH).unwrap_or_else(|e| panic!("{name}: {e}"));
            }));
            parts.push(millis(|| {
                nvrtc::compile_module_uncached(&module, nvrtc::CHECK_ARCH).unwrap_or_else(|e| panic!("{name}: {e}"));
            }));
            ptx.push(millis(|| {
                nvrtc::compile_module_uncached(&module, "compute_90").unwrap_or_else(|e| panic!("{name}: {e}"));
            }));
        }
        let kernels = module.kernels.len();
        println!("{name:<16} {kernels:>8} {:>10.0} {:>10.0} {:>14.0}", median(whole), median(parts), median(ptx));
    }
}
