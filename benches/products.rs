//! Product benchmark, for tuning the CUDA backend's tiled products on a card: for each product of
//! the standard workloads that kiln may tile (`Function::cuda_products`: one per shape and operand
//! layout, `+N` saying how many more share it), `relu(a b + bias)` is timed on the device with
//! CUDA events around each step (`KILN_CUDA_PROFILE`: the device's time for the product and its
//! epilogue, not the host's share of a call) as cuBLAS plus an epilogue kernel, as kiln tiles it by
//! default, and with each tile shape (32x32, 32x32k4, 64x64, 128x64, 128x128) and number of slices
//! forced, by float32 FMAs, the shapes kiln picks also with three slab buffers filled by
//! asynchronous copies (`/p3` columns) and 64x64 and 128x64 ones with as many as fit of eight
//! (`/p8`), 32x32k4 and 64x64 tiles with a tile's slices as a thread
//! block cluster (`/cluster` columns), and (`tc` columns, fewer slice counts) on tensor cores at
//! float32 accuracy (3xTF32), through registers and (`/p3`) with three buffers of copies, the
//! 32x32 and 64x64 ones also with a tile's slices as a cluster (`/p3/cluster`). Prints
//! microseconds per call, one row per product, the fastest variant marked `*`;
//! `--write-table FILE` writes the fastest of each product as a tile table, which
//! `KILN_CUDA_TILES=FILE` then makes the CUDA backend follow (the step benchmark's tuned row).
//! The last line says how far kiln's own choices are from the fastest, over every product.
//! On a GPU, every program is first compiled by NVRTC on all cores.
//!
//! `cargo bench --bench products [-- --device cuda|cuda:N|cuda-emulator] [--calls N] [--seconds S]
//! [--case TEXT] [--variant TEXT] [--write-table FILE]` (each variant timed over at most N calls,
//! default 200, or S seconds, default 0.1, and at least ten calls; `--case`, `--variant`: only the
//! products, or the columns, whose name holds TEXT: `--variant tc` times the tensor-core tilings alone, with cuBLAS
//! and kiln's own choice) (on a device without a profile, such as the emulator, it only checks
//! that every variant runs, and a table it writes is empty).

use kiln::prelude::*;
use kiln_codegen::cuda::{with_tile_choice, ProductKey, TileChoice, TileShape, TileTable};

/// A product of the workloads: where it comes from (its workload and kernel names, and how many
/// other products share its shape and layout) and its shape and layout.
struct Case {
    name: String,
    key: ProductKey,
}

/// Every product of the standard workloads that a tile table can direct, one per shape and layout,
/// in the workloads' order.
fn cases() -> kiln::Result<Vec<Case>> {
    let mut cases: Vec<(String, ProductKey, usize)> = vec![];
    for workload in kiln::workloads::NAMES {
        let w = kiln::workloads::build(workload, Device::Reference)?;
        for (kernel, key) in w.step.cuda_products(&w.args)? {
            match cases.iter_mut().find(|c| c.1 == key) {
                Some(c) => c.2 += 1,
                None => cases.push((format!("{workload} {}", kernel.trim_end_matches("_matmul")), key, 0)),
            }
        }
    }
    Ok(cases
        .into_iter()
        .map(|(name, key, more)| Case { name: if more > 0 { format!("{name} +{more}") } else { name }, key })
        .collect())
}

/// The variants timed: a label and the tiling it forces.
fn variants() -> Vec<(String, TileChoice)> {
    let mut v = vec![
        ("cuBLAS".to_string(), TileChoice { tiled: Some(false), ..TileChoice::default() }),
        ("kiln".to_string(), TileChoice::default()),
    ];
    for tensor_cores in [false, true] {
        let slice_counts: &[usize] = if tensor_cores { &[1, 4, 12] } else { &[1, 2, 4, 8, 12] };
        for tile in TileShape::ALL {
            // On tensor cores 32x32k4 tiles are 32x32 ones. 128x128 tiles lost on every product
            // in both H100 runs: fewer slice counts, and none on tensor cores (the time saved goes
            // to the asynchronous copies below).
            let slice_counts = match tile {
                TileShape::T32x32K4 | TileShape::T128x128 if tensor_cores => continue,
                TileShape::T128x128 => &[1, 4],
                _ => slice_counts,
            };
            for &slices in slice_counts {
                let choice = TileChoice::forced(tile, slices, tensor_cores);
                v.push((choice.label().expect("a whole choice"), choice));
            }
        }
    }
    // The shapes kiln picks by FMAs again with three slab buffers filled by asynchronous copies,
    // and 128x128 tiles (which may need them most: a block an SM, few warps to hide memory).
    for tile in [TileShape::T32x32K4, TileShape::T64x64, TileShape::T128x64, TileShape::T128x128] {
        let slice_counts: &[usize] = if tile == TileShape::T128x128 { &[1, 4] } else { &[1, 4, 8] };
        for &slices in slice_counts {
            let choice = TileChoice { stages: Some(3), ..TileChoice::forced(tile, slices, false) };
            v.push((choice.label().expect("a whole choice"), choice));
        }
    }
    // 64x64 and 128x64 tiles with as many buffers as fit of eight (five and seven: `/p8` columns;
    // 32x32k4 tiles fit three, their `/p3` columns).
    for tile in [TileShape::T64x64, TileShape::T128x64] {
        for slices in [1, 4, 8] {
            let choice = TileChoice { stages: Some(8), ..TileChoice::forced(tile, slices, false) };
            v.push((choice.label().expect("a whole choice"), choice));
        }
    }
    // Tensor cores with three buffers filled by asynchronous copies, each slab split by the block
    // once landed (`tcRxC/sN/p3`), 128x128 tiles too: of the tile shapes they do the most
    // multiply-adds for each word split.
    for tile in [TileShape::T32x32, TileShape::T64x64, TileShape::T128x64, TileShape::T128x128] {
        for slices in [1, 2, 4] {
            let choice = TileChoice { stages: Some(3), ..TileChoice::forced(tile, slices, true) };
            v.push((choice.label().expect("a whole choice"), choice));
        }
    }
    // The smaller shapes with a tile's slices as a thread block cluster (`/cluster` columns), and
    // on tensor cores with three buffers as `KILN_CUDA_TF32X3=1` runs them on compute capability
    // 9.0 and the autotuner tries them (`tc32x32/s4/p3/cluster`).
    for tile in [TileShape::T32x32K4, TileShape::T64x64] {
        for slices in [2, 4, 8] {
            let choice = TileChoice { cluster: Some(true), ..TileChoice::forced(tile, slices, false) };
            v.push((choice.label().expect("a whole choice"), choice));
        }
    }
    for tile in [TileShape::T32x32, TileShape::T64x64] {
        for slices in [2, 4, 8] {
            let choice = TileChoice { stages: Some(3), cluster: Some(true), ..TileChoice::forced(tile, slices, true) };
            v.push((choice.label().expect("a whole choice"), choice));
        }
    }
    v
}

/// A case's graph (`relu(a b + bias)`), its inputs and output, and arguments.
struct Prepared {
    g: Graph,
    inputs: [Var; 3],
    out: Var,
    args: [Tensor; 3],
}

/// `relu(a b + bias)` for case `c`, its operands stored in the case's layout.
fn prepare(c: &Case) -> Prepared {
    let ProductKey { m, k, n, a_transposed, b_transposed } = c.key;
    let g = Graph::new();
    let a_shape = if a_transposed { [k, m] } else { [m, k] };
    let b_shape = if b_transposed { [n, k] } else { [k, n] };
    let (a_in, b_in) = (g.input("a", F32, a_shape), g.input("b", F32, b_shape));
    let a = if a_transposed { a_in.t() } else { a_in.clone() };
    let b = if b_transposed { b_in.t() } else { b_in.clone() };
    let bias = g.input("bias", F32, [n]);
    let out = (a.matmul(&b) + &bias).relu();
    let args = [
        kiln::testing::random_tensor(&a_shape, -1.0, 1.0, 1).cast(F32),
        kiln::testing::random_tensor(&b_shape, -1.0, 1.0, 2).cast(F32),
        kiln::testing::random_tensor(&[n], -1.0, 1.0, 3).cast(F32),
    ];
    Prepared { g, inputs: [a_in, b_in, bias], out, args }
}

/// Compiles every (case, variant) program with NVRTC for the card's `arch`, on all cores, into
/// NVRTC's in-process cache, where timing each of them then finds it (one after another, NVRTC
/// would take most of the run). A program that fails here fails again when timed, and says why.
#[cfg(feature = "cuda")]
fn precompile(cases: &[Case], variants: &[(String, TileChoice)], arch: &'static str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let jobs: Vec<(usize, usize)> = (0..cases.len()).flat_map(|c| (0..variants.len()).map(move |v| (c, v))).collect();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                // Jobs go out in case order, so a thread's next job is mostly of the case it holds.
                let mut held: Option<(usize, Prepared, Function)> = None;
                while let Some(&(c, v)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if held.as_ref().is_none_or(|h| h.0 != c) {
                        let p = prepare(&cases[c]);
                        let Ok(f) = p.g.function(p.inputs.iter(), [&p.out]).compile(Device::Reference) else {
                            continue;
                        };
                        held = Some((c, p, f));
                    }
                    let (_, p, f) = held.as_ref().expect("held");
                    if let Ok(module) = with_tile_choice(variants[v].1, || f.cuda_module(&p.args)) {
                        let _ = kiln_codegen::cuda::nvrtc::compile_module(&module, arch);
                    }
                }
            });
        }
    });
}

/// The card's name and arch, once every program is compiled for it (`precompile`); the device's
/// name where it is not a GPU.
#[cfg(feature = "cuda")]
fn ready(device: Device, cases: &[Case], variants: &[(String, TileChoice)]) -> kiln::Result<String> {
    let Device::Cuda(ordinal) = device else { return Ok(format!("{device:?}")) };
    let gpu = kiln_codegen::cuda::runtime::Gpu::get(ordinal)?;
    let t = std::time::Instant::now();
    precompile(cases, variants, gpu.arch);
    eprintln!("{} programs compiled in {:.1} s", cases.len() * variants.len(), t.elapsed().as_secs_f64());
    Ok(format!("{} ({})", gpu.name, gpu.arch))
}

#[cfg(not(feature = "cuda"))]
fn ready(device: Device, _: &[Case], _: &[(String, TileChoice)]) -> kiln::Result<String> {
    Ok(format!("{device:?}"))
}

/// Device microseconds per call of case `c` under `choice` (`None` where the device keeps no
/// profile), after checking that the program has the form asked for and the CPU's result `want`.
fn time(
    c: &Case,
    p: &Prepared,
    want: &Tensor,
    device: Device,
    choice: TileChoice,
    calls: usize,
    seconds: f64,
) -> kiln::Result<Option<f64>> {
    let mut f = with_tile_choice(choice, || -> kiln::Result<Function> {
        let mut f = p.g.function(p.inputs.iter(), [&p.out]).compile(device)?;
        f.call(&p.args)?;
        Ok(f)
    })?;
    let code = f.generated_code();
    let on = if choice.tensor_cores == Some(true) { " on tensor cores" } else { "" };
    let form = match (choice.tiled, choice.tile) {
        (Some(false), _) => "cuBLAS".to_string(),
        (_, Some(t)) => format!("in {} tiles{on}", t.label()),
        _ => String::new(),
    };
    if !code.contains(&form) {
        return Err(kiln::Error::Invalid(format!("{}: the program has no '{form}'", c.name)));
    }
    let err = f.call(&p.args)?[0].max_abs_diff(want);
    if err > 1e-5 * c.key.k as f64 {
        return Err(kiln::Error::Invalid(format!("{}: differs from the CPU by {err}", c.name)));
    }
    // The two calls so far are left out: a first call can pay for more than the product (cuBLAS
    // loads its kernels for a new shape there, which took 90 ms on an H100).
    let warm_up = f.profile().map_or(0.0, |p| p.seconds_per_call * 2.0);
    // At most `calls` calls or `seconds` (at least ten calls): each call also copies the output to
    // the host, which for fmnist-mlp-4k's products took longer than the product.
    let start = std::time::Instant::now();
    let mut done = 0;
    while done < calls && (done < 10 || start.elapsed().as_secs_f64() < seconds) {
        f.call(&p.args)?;
        done += 1;
    }
    Ok(f.profile().map(|p| (p.seconds_per_call * (done + 2) as f64 - warm_up) / done as f64 * 1e6))
}

fn main() -> kiln::Result<()> {
    let mut device = Device::Cuda(0);
    let (mut calls, mut seconds, mut filter, mut columns, mut table_path) =
        (200, 0.1, String::new(), String::new(), None);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--device" => match it.next().as_deref().map(Device::parse) {
                Some(Ok(d)) => device = d,
                _ => {
                    eprintln!("--device cuda|cuda:N|cuda-emulator");
                    std::process::exit(2)
                }
            },
            "--calls" => calls = it.next().and_then(|s| s.parse().ok()).unwrap_or(calls),
            "--seconds" => seconds = it.next().and_then(|s| s.parse().ok()).unwrap_or(seconds),
            "--case" => filter = it.next().unwrap_or_default(),
            "--variant" => columns = it.next().unwrap_or_default(),
            "--write-table" => table_path = it.next(),
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2)
            }
        }
    }
    let calls = calls.max(1);
    // Read when each function is compiled: every CUDA function below keeps a profile.
    std::env::set_var("KILN_CUDA_PROFILE", "1");
    let keep = |label: &str| label.contains(&columns) || label == "cuBLAS" || label == "kiln";
    let variants: Vec<_> = variants().into_iter().filter(|(label, _)| keep(label)).collect();
    let cases: Vec<Case> = cases()?.into_iter().filter(|c| c.name.contains(&filter)).collect();
    let card = ready(device, &cases, &variants)?;
    let width = variants.iter().map(|(l, _)| l.len()).max().unwrap_or(8).max(7);
    print!("{:<28} {:>17}", "product (us per call)", "m x k x n");
    for (label, _) in &variants {
        print!(" {label:>width$}");
    }
    println!();
    let mut table = TileTable::default();
    // kiln's own choice against the fastest variant, per product: how good its rule is on the card.
    let kiln_column = variants.iter().position(|(label, _)| label == "kiln");
    let mut kiln_against_best: Vec<(&str, f64, f64)> = vec![];
    for c in &cases {
        let p = prepare(c);
        let want = p.g.function(p.inputs.iter(), [&p.out]).compile(Device::Cpu)?.call(&p.args)?.remove(0);
        let times: Vec<Option<f64>> = variants
            .iter()
            .map(|(label, choice)| match time(c, &p, &want, device, *choice, calls, seconds) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{} {label}: {e}", c.name);
                    None
                }
            })
            .collect();
        let best = times.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        print!("{:<28} {:>17}", c.name, c.key.to_string());
        for t in &times {
            let cell = match t {
                Some(t) if *t == best => format!("{t:.1}*"),
                Some(t) => format!("{t:.1}"),
                None => "-".into(),
            };
            print!(" {cell:>width$}");
        }
        println!();
        if let Some(Some(kiln)) = kiln_column.map(|k| times[k]) {
            kiln_against_best.push((&c.name, kiln, best));
        }
        if let Some(fastest) = times.iter().position(|t| *t == Some(best)) {
            table.insert(c.key, variants[fastest].1)?;
        }
        // Written after each product, so that a run cut short still leaves what it measured.
        if let Some(path) = &table_path {
            let heading = format!(
                "kiln tile table: the fastest way to compute each product, as timed by\n\
                 `cargo bench --bench products -- --write-table` on {card}, up to {calls} calls or {seconds} s each.\n\
                 Use it with KILN_CUDA_TILES={path}."
            );
            std::fs::write(path, table.to_text(&heading))
                .map_err(|e| kiln::Error::Invalid(format!("--write-table {path}: {e}")))?;
        }
    }
    if !kiln_against_best.is_empty() {
        let n = kiln_against_best.len() as f64;
        let geo = (kiln_against_best.iter().map(|(_, k, b)| (k / b).ln()).sum::<f64>() / n).exp();
        let (kiln_sum, best_sum) = kiln_against_best.iter().fold((0.0, 0.0), |(s, t), (_, k, b)| (s + k, t + b));
        let (worst, k, b) = kiln_against_best.iter().max_by(|x, y| (x.1 / x.2).total_cmp(&(y.1 / y.2))).expect("some");
        println!(
            "kiln's own choice: {:.1}% over the fastest variant of each product (geometric mean of {n}), \
             {kiln_sum:.1} us against {best_sum:.1} in all; the worst {:.2}x ({worst})",
            (geo - 1.0) * 100.0,
            k / b
        );
    }
    if let Some(path) = &table_path {
        eprintln!("tile table of {} products written to {path}", table.entries.len());
    }
    Ok(())
}
