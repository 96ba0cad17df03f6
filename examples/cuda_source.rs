//! The CUDA C of a standard workload's training step, as the CUDA backend would compile it, on
//! any machine (no GPU needed): the step's launches, then every kernel headed by the graph nodes
//! and source lines it computes. With `--resources`, what ptxas makes of each kernel for an H100
//! instead (registers a thread, spills, static shared memory, and the dynamic shared memory a
//! kernel past 48 KiB is launched with; needs libnvrtc), which is how a kernel change is checked
//! for register pressure before a GPU is at hand. The CUDA backend's variables apply
//! (`KILN_CUDA_STAGES=3`, `KILN_CUDA_PDL=1`, `KILN_CUDA_TILES=FILE`, ...).
//!
//! With `--cubin FILE`, the machine code for an H100 is written to FILE as well, to read its
//! instructions with `nvdisasm` (pip package `nvidia-cuda-nvdisasm`) before a GPU is at hand.
//!
//! With `--loads`, where ptxas placed each product's slab loads in the loop over the slabs (needs
//! `nvdisasm`: `kiln_codegen::cuda::sass`): a loop's multiply-adds, its instructions (every arm of
//! its branches counted: what a turn costs the SM's schedulers beside its multiply-adds), and, for
//! each global load (`LDG`) or asynchronous copy (`LDGSTS`), how many multiply-adds come before it.
//! Loads meant for the next slab that come after the multiply-adds make each slab wait for memory
//! in full.
//!
//! `cargo run --release --example cuda_source -- [--workload NAME] [--resources] [--cubin FILE] [--loads]`

use clap::Parser;
use kiln::workloads::{build, NAMES};
use kiln::Device;
use kiln_codegen::cuda::nvrtc::{compile, kernel_resources, CHECK_ARCH};
use std::io::Write;

#[derive(Parser)]
struct Args {
    /// keras-mlp, fmnist-mlp, fmnist-mlp-4k or autoencoder
    #[arg(long, default_value = "fmnist-mlp")]
    workload: String,
    /// Print ptxas's report on each kernel rather than the CUDA C.
    #[arg(long)]
    resources: bool,
    /// Also write the step's cubin for an H100 (sm_90) to this file.
    #[arg(long)]
    cubin: Option<std::path::PathBuf>,
    /// Print where the machine code's loops over slabs load, rather than the CUDA C.
    #[arg(long)]
    loads: bool,
}

fn main() -> kiln::Result<()> {
    let args = Args::parse();
    if !NAMES.contains(&args.workload.as_str()) {
        return Err(kiln::Error::Invalid(format!("--workload {}: expected one of {NAMES:?}", args.workload)));
    }
    let w = build(&args.workload, Device::Reference)?;
    let source = w.step.cuda_source(&w.args)?;
    if let Some(path) = &args.cubin {
        let (cubin, _) = compile(&source, CHECK_ARCH)?;
        std::fs::write(path, cubin).map_err(|e| kiln::Error::Invalid(format!("--cubin {}: {e}", path.display())))?;
    }
    let mut text = String::new();
    if args.loads {
        let (cubin, _) = compile(&source, CHECK_ARCH)?;
        text = slab_loads(&cubin)?;
    } else if args.resources {
        let header = ("kernel", "registers", "spills", "shared bytes", "dynamic");
        text.push_str(&format!("{:<40} {:>9} {:>7} {:>12} {:>8}\n", header.0, header.1, header.2, header.3, header.4));
        for k in kernel_resources(&source, CHECK_ARCH)? {
            let spills = k.spill_stores + k.spill_loads;
            let dynamic = dynamic_shared_bytes(&source, &k.name);
            text.push_str(&format!(
                "{:<40} {:>9} {:>7} {:>12} {:>8}\n",
                k.name, k.registers, spills, k.shared_bytes, dynamic
            ));
        }
    } else {
        text = source;
    }
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(kiln::Error::Invalid(format!("stdout: {e}"))),
        _ => Ok(()),
    }
}

/// `--loads`: each loop of the cubin's kernels that multiplies and loads, with where its loads are.
fn slab_loads(cubin: &[u8]) -> kiln::Result<String> {
    let loops = kiln_codegen::cuda::sass::loops(cubin)?;
    let mut text = String::new();
    for l in loops.iter().filter(|l| l.multiply_adds >= 16 && !l.loads.is_empty()) {
        text.push_str(&l.describe());
        text.push('\n');
    }
    Ok(text)
}

/// The dynamic shared memory kernel `name` is launched with, as its code asserts it (0: none).
fn dynamic_shared_bytes(source: &str, name: &str) -> usize {
    let Some(start) = source.find(&format!(" {name}(")) else { return 0 };
    let end = source[start..].find("\nextern \"C\"").map_or(source.len(), |e| start + e);
    let assertion = "static_assert(sizeof(kiln_shared) == ";
    source[start..end]
        .find(assertion)
        .and_then(|at| source[start + at + assertion.len()..end].split(',').next()?.trim().parse().ok())
        .unwrap_or(0)
}
