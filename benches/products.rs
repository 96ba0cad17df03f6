//! Product benchmark, for tuning the CUDA backend's tiled products on a card: for each product of
//! the standard workloads (its shape and operand layout), `relu(a b + bias)` is timed on the device
//! with CUDA events around each step (`KILN_CUDA_PROFILE`: the device's time for the product and
//! its epilogue, not the host's share of a call) as cuBLAS plus an epilogue kernel, as kiln tiles
//! it by default, and with each tile shape (32x32, 64x64, 128x64, 128x128) and number of slices
//! forced, by float32 FMAs and (`tc` columns, fewer slice counts) on tensor cores at float32
//! accuracy (3xTF32). Prints microseconds per call, one row per product, the fastest variant
//! marked `*`.
//!
//! `cargo bench --bench products [-- --device cuda|cuda:N|cuda-emulator] [--calls N] [--case TEXT]
//! [--variant TEXT]` (`--case`, `--variant`: only the products, or the columns, whose name holds
//! TEXT: `--variant tc` times the tensor-core tilings alone, with cuBLAS and kiln's own choice)
//! (on a device without a profile, such as the emulator, it only checks that every variant runs).

use kiln::prelude::*;
use kiln_codegen::cuda::{with_tile_choice, TileChoice, TileShape};

/// A product of the workloads: its name, `m x k x n`, and whether `a` (`[k, m]`) and `b` (`[n, k]`)
/// are stored transposed (weight gradients read `a` transposed, input gradients `b`).
struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    a_transposed: bool,
    b_transposed: bool,
}

const fn case(name: &'static str, m: usize, k: usize, n: usize, a_transposed: bool, b_transposed: bool) -> Case {
    Case { name, m, k, n, a_transposed, b_transposed }
}

const CASES: [Case; 15] = [
    case("fmnist-mlp dense1", 128, 784, 256, false, false),
    case("fmnist-mlp dense2", 128, 256, 256, false, false),
    case("fmnist-mlp dH1", 128, 256, 256, false, true),
    case("fmnist-mlp dW1", 784, 128, 256, true, false),
    case("fmnist-mlp dW2", 256, 128, 256, true, false),
    case("autoencoder dense1", 128, 784, 1000, false, false),
    case("autoencoder dense2", 128, 1000, 500, false, false),
    case("autoencoder dH7", 128, 1000, 784, false, true),
    case("autoencoder dW1", 784, 128, 1000, true, false),
    case("autoencoder dW2", 1000, 128, 500, true, false),
    case("fmnist-mlp-4k dense1", 4096, 784, 256, false, false),
    case("fmnist-mlp-4k dense2", 4096, 256, 256, false, false),
    case("fmnist-mlp-4k dH1", 4096, 256, 256, false, true),
    case("fmnist-mlp-4k dW1", 784, 4096, 256, true, false),
    case("fmnist-mlp-4k dW2", 256, 4096, 256, true, false),
];

/// The variants timed: a label and the tiling it forces.
fn variants() -> Vec<(String, TileChoice)> {
    let mut v = vec![
        ("cuBLAS".to_string(), TileChoice { tiled: Some(false), ..TileChoice::default() }),
        ("kiln".to_string(), TileChoice::default()),
    ];
    for tensor_cores in [false, true] {
        let slice_counts: &[usize] = if tensor_cores { &[1, 4, 12] } else { &[1, 2, 4, 8, 12] };
        for tile in TileShape::ALL {
            for &slices in slice_counts {
                let choice = TileChoice::forced(tile, slices, tensor_cores);
                let on = if tensor_cores { "tc" } else { "" };
                v.push((format!("{on}{}/s{slices}", tile.label()), choice));
            }
        }
    }
    v
}

/// A case's graph, arguments and the CPU backend's result.
struct Prepared {
    g: Graph,
    inputs: [Var; 3],
    out: Var,
    args: [Tensor; 3],
    want: Tensor,
}

fn prepare(c: &Case) -> kiln::Result<Prepared> {
    let g = Graph::new();
    let a_shape = if c.a_transposed { [c.k, c.m] } else { [c.m, c.k] };
    let b_shape = if c.b_transposed { [c.n, c.k] } else { [c.k, c.n] };
    let (a_in, b_in) = (g.input("a", F32, a_shape), g.input("b", F32, b_shape));
    let a = if c.a_transposed { a_in.t() } else { a_in.clone() };
    let b = if c.b_transposed { b_in.t() } else { b_in.clone() };
    let bias = g.input("bias", F32, [c.n]);
    let out = (a.matmul(&b) + &bias).relu();
    let args = [
        kiln::testing::random_tensor(&a_shape, -1.0, 1.0, 1).cast(F32),
        kiln::testing::random_tensor(&b_shape, -1.0, 1.0, 2).cast(F32),
        kiln::testing::random_tensor(&[c.n], -1.0, 1.0, 3).cast(F32),
    ];
    let inputs = [a_in, b_in, bias];
    let want = g.function(inputs.iter(), [&out]).compile(Device::Cpu)?.call(&args)?.remove(0);
    Ok(Prepared { g, inputs, out, args, want })
}

/// Device microseconds per call of case `c` under `choice` (`None` where the device keeps no
/// profile), after checking that the program has the form asked for and the CPU's result.
fn time(c: &Case, p: &Prepared, device: Device, choice: TileChoice, calls: usize) -> kiln::Result<Option<f64>> {
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
    let err = f.call(&p.args)?[0].max_abs_diff(&p.want);
    if err > 1e-5 * c.k as f64 {
        return Err(kiln::Error::Invalid(format!("{}: differs from the CPU by {err}", c.name)));
    }
    for _ in 0..calls {
        f.call(&p.args)?;
    }
    Ok(f.profile().map(|p| p.seconds_per_call * 1e6))
}

fn main() {
    let mut device = Device::Cuda(0);
    let (mut calls, mut filter, mut columns) = (200, String::new(), String::new());
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
            "--case" => filter = it.next().unwrap_or_default(),
            "--variant" => columns = it.next().unwrap_or_default(),
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2)
            }
        }
    }
    // Read when each function is compiled: every CUDA function below keeps a profile.
    std::env::set_var("KILN_CUDA_PROFILE", "1");
    let keep = |label: &str| label.contains(&columns) || label == "cuBLAS" || label == "kiln";
    let variants: Vec<_> = variants().into_iter().filter(|(label, _)| keep(label)).collect();
    let width = variants.iter().map(|(l, _)| l.len()).max().unwrap_or(8).max(7);
    print!("{:<22} {:>16}", "product (us per call)", "m x k x n");
    for (label, _) in &variants {
        print!(" {label:>width$}");
    }
    println!();
    for c in CASES.iter().filter(|c| c.name.contains(&filter)) {
        let shape = format!(
            "{}x{}{}x{}{}",
            c.m,
            c.k,
            if c.a_transposed { "^T" } else { "" },
            c.n,
            if c.b_transposed { "^T" } else { "" }
        );
        let prepared = match prepare(c) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{}: {e}", c.name);
                continue;
            }
        };
        let times: Vec<Option<f64>> = variants
            .iter()
            .map(|(label, choice)| match time(c, &prepared, device, *choice, calls) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{} {label}: {e}", c.name);
                    None
                }
            })
            .collect();
        let best = times.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        print!("{:<22} {shape:>16}", c.name);
        for t in &times {
            let cell = match t {
                Some(t) if *t == best => format!("{t:.1}*"),
                Some(t) => format!("{t:.1}"),
                None => "-".into(),
            };
            print!(" {cell:>width$}");
        }
        println!();
    }
}
