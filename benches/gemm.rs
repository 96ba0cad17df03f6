//! GEMM benchmark: GFLOP/s of kiln's AVX-512 sgemm and of matrixmultiply's on one core, for the
//! matrix shapes of the standard workloads' training steps (forward products, input gradients with
//! a transposed B, weight gradients with a transposed A). Medians of repeated runs; prints a table.
//!
//! With `--cold`, a 64 MiB buffer is written before every run, so the operands come from memory
//! as in a training step (where the other layers' weights and activations pass through the caches
//! between two uses of a matrix), not from the caches as in a loop over one product.
//!
//! `cargo bench --bench gemm [-- --seconds S] [--cold]`

use kiln_codegen::cpu::gemm;
use std::time::Instant;

/// (label, m, k, n, A transposed, B transposed)
const SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("keras fwd 20->64", 16, 20, 64, false, false),
    ("keras dW 64x10", 64, 16, 10, true, false),
    ("keras dX 10->64", 16, 10, 64, false, true),
    ("ae fwd 784->1000", 128, 784, 1000, false, false),
    ("ae fwd 1000->500", 128, 1000, 500, false, false),
    ("ae fwd 500->250", 128, 500, 250, false, false),
    ("ae fwd 250->30", 128, 250, 30, false, false),
    ("ae dX 1000->784", 128, 1000, 784, false, true),
    ("ae dX 500->1000", 128, 500, 1000, false, true),
    ("ae dW 784x1000", 784, 128, 1000, true, false),
    ("ae dW 1000x500", 1000, 128, 500, true, false),
    ("4k fwd 784->256", 4096, 784, 256, false, false),
    ("4k fwd 256->256", 4096, 256, 256, false, false),
    ("4k dX 256->256", 4096, 256, 256, false, true),
    ("4k dW 784x256", 784, 4096, 256, true, false),
    ("4k dW 256x256", 256, 4096, 256, true, false),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut seconds = 0.3;
    let mut cold = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().and_then(|s| s.parse().ok()).expect("--seconds S"),
            "--cold" => cold = true,
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2)
            }
        }
    }
    if !gemm::available() {
        eprintln!("this CPU has no AVX-512F: kiln uses matrixmultiply, nothing to compare");
        return;
    }
    let caches = if cold { "operands from memory" } else { "operands in cache" };
    println!(
        "{:<18} {:>5} {:>5} {:>5}  {:>10} {:>14} {:>12}  (GFLOP/s per core, median, {caches})",
        "shape", "m", "k", "n", "kiln", "matrixmultiply", "kiln, split"
    );
    for &(label, m, k, n, ta, tb) in SHAPES {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let mut c = vec![0f32; m * n];
        let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
        let flops = 2.0 * (m * k * n) as f64;
        let mut evict = vec![0u8; if cold { 64 << 20 } else { 0 }];
        let mut time = |f: &mut dyn FnMut()| {
            f();
            let mut runs = vec![];
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < seconds || runs.len() < 5 {
                for (i, chunk) in evict.chunks_mut(64).enumerate() {
                    chunk[0] = i as u8;
                }
                std::hint::black_box(&evict);
                let t = Instant::now();
                f();
                runs.push(t.elapsed().as_secs_f64());
            }
            flops / median(runs) / 1e9
        };
        let c_ptr = c.as_mut_ptr();
        let op = gemm::Operands { a: a.as_ptr(), rsa, csa, b: b.as_ptr(), rsb, csb, c: c_ptr, ldc: n };
        // SAFETY: the operands describe the m x k, k x n and m x n matrices allocated above.
        let kiln = time(&mut || unsafe { gemm::sgemm(m, k, n, op) });
        let team = kiln_codegen::cpu::team::Team::global();
        let parts = team.threads();
        // Split as the runtime splits: by rows of C when it has more rows than columns, else by
        // columns.
        let split = move |p: usize| {
            let op = op; // the whole (Sync) struct, not its raw-pointer fields
            let (len, by_rows) = if m >= n { (m, true) } else { (n, false) };
            let per = len.div_ceil(parts);
            let (i0, i1) = (p * per, ((p + 1) * per).min(len));
            // SAFETY: a block of the matrices above; blocks of C are disjoint.
            unsafe {
                let (oa, ob) = (op.a.offset(i0 as isize * rsa), op.b.offset(i0 as isize * csb));
                if by_rows {
                    gemm::sgemm(i1 - i0, k, n, gemm::Operands { a: oa, c: op.c.add(i0 * n), ..op })
                } else {
                    gemm::sgemm(m, k, i1 - i0, gemm::Operands { b: ob, c: op.c.add(i0), ..op })
                }
            }
        };
        let all = time(&mut || team.run(parts, &split)) / parts as f64;
        let mm = time(&mut || unsafe {
            matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 0.0, c_ptr, n as isize, 1)
        });
        println!("{label:<18} {m:>5} {k:>5} {n:>5}  {kiln:>10.1} {mm:>14.1} {all:>12.1}");
    }
}
