//! Step-time benchmark: for each standard workload (see `kiln::workloads`), the median, min and max
//! milliseconds of a full training step (forward, backward, optimizer update, f32) after warm-up,
//! and the compile time (graph building, optimization and the shape specialization's code
//! generation). Prints a table, or with `--json` one JSON array. With `--autotune` (a CUDA device)
//! each step is autotuned first (`Function::autotune`, at most `--autotune-budget S` seconds a
//! workload, default 120; its report on stderr) and the table gives the tuned step's times.
//!
//! `cargo bench --bench steps [-- --json] [--device cpu|reference|cuda|cuda:N] [--workload NAME] [--seconds S]
//! [--autotune] [--autotune-budget S]`

use kiln::workloads::{build, NAMES};
use kiln::Device;
use std::time::Instant;

struct Args {
    json: bool,
    device: Device,
    workloads: Vec<String>,
    seconds: f64,
    /// Seconds of autotuning a workload may take (`None`: no autotune).
    autotune: Option<f64>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { json: false, device: Device::Cpu, workloads: vec![], seconds: 2.0, autotune: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => a.json = true,
            "--device" => {
                a.device = match it.next().as_deref().map(Device::parse) {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(format!("--device: {e}")),
                    None => return Err("--device needs a value (cpu, reference, cuda, cuda:N)".into()),
                }
            }
            "--workload" => a.workloads.push(it.next().ok_or("--workload NAME")?),
            "--seconds" => a.seconds = it.next().and_then(|s| s.parse().ok()).ok_or("--seconds S")?,
            "--autotune" => a.autotune = Some(a.autotune.unwrap_or(120.0)),
            "--autotune-budget" => {
                a.autotune = Some(it.next().and_then(|s| s.parse().ok()).ok_or("--autotune-budget S")?)
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.workloads.is_empty() {
        a.workloads = NAMES.iter().map(|s| s.to_string()).collect();
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let device = match args.device {
        Device::Cuda(n) => format!("cuda:{n}"),
        d => format!("{d:?}").to_lowercase(),
    };
    let mut rows = vec![];
    for name in &args.workloads {
        let mut w = build(name, args.device).unwrap_or_else(|e| {
            eprintln!("{name}: {e}");
            std::process::exit(1)
        });
        let t = Instant::now();
        w.step.prepare(&w.args).unwrap_or_else(|e| panic!("{name}: {e}"));
        let compile_ms = (w.build_seconds + t.elapsed().as_secs_f64()) * 1e3;
        for line in w.step.compile_stats() {
            eprintln!("{name} compile: {line}");
        }
        if let Some(budget) = args.autotune {
            let opts = kiln::AutotuneOptions { budget_seconds: budget, ..kiln::AutotuneOptions::default() };
            match w.step.autotune(&w.args, &opts) {
                Ok(report) => eprint!("{name} {report}"),
                Err(e) => {
                    eprintln!("{name}: autotune: {e}");
                    std::process::exit(1)
                }
            }
        }
        for _ in 0..3 {
            w.step.call(&w.args).unwrap();
        }
        let mut times = vec![];
        let start = Instant::now();
        while (start.elapsed().as_secs_f64() < args.seconds || times.len() < 10) && times.len() < 2000 {
            let t = Instant::now();
            w.step.call(&w.args).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        rows.push((name.clone(), w.batch, median, times[0], times[times.len() - 1], times.len(), compile_ms));
    }
    if args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|(n, b, med, min, max, steps, c)| {
                format!(
                    "{{\"workload\": \"{n}\", \"device\": \"{device}\", \"batch\": {b}, \"median_ms\": {med:.4}, \"min_ms\": {min:.4}, \"max_ms\": {max:.4}, \"steps\": {steps}, \"compile_ms\": {c:.2}}}"
                )
            })
            .collect();
        println!("[{}]", items.join(", "));
    } else {
        println!(
            "{:<15} {:<9} {:>6} {:>10} {:>9} {:>9} {:>6} {:>11}",
            "workload", "device", "batch", "median_ms", "min_ms", "max_ms", "steps", "compile_ms"
        );
        for (n, b, med, min, max, steps, c) in rows {
            println!("{n:<15} {device:<9} {b:>6} {med:>10.3} {min:>9.3} {max:>9.3} {steps:>6} {c:>11.1}");
        }
    }
}
