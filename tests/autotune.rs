//! `Function::autotune` on the CUDA backend's program (the CUDA emulator, and the GPU where there
//! is one): a training step of two products large enough to tile is timed under each candidate,
//! the weights it updates are as before when tuning ends, the tuned function computes each
//! product as the report says and a step equal to the reference's, and a second autotune of the
//! same step reads the result from the cache. Off the CUDA backend autotune is an error.

use kiln::prelude::*;
use kiln::testing::random_tensor;
use kiln::{AutotuneOptions, AutotuneReport, Disconnected};
use kiln_codegen::cuda::autotune::Space;
use kiln_codegen::cuda::TileChoice;

/// A two-layer classifier's SGD step (64x128 inputs, 96 hidden units, 10 classes): its forward
/// product and the first layer's weight gradient (64x128x96 each) are tiled; the rest are small.
struct Step {
    f: Function,
    params: Vec<Var>,
    args: Vec<Tensor>,
}

fn step(device: Device) -> Step {
    let g = Graph::new();
    let x = g.input("x", F32, [64, 128]);
    let y = g.input("y", I64, [64]);
    let w1 = g.shared("w1", random_tensor(&[128, 96], -0.2, 0.2, 1).cast(F32));
    let b1 = g.shared("b1", random_tensor(&[96], -0.1, 0.1, 2).cast(F32));
    let w2 = g.shared("w2", random_tensor(&[96, 10], -0.2, 0.2, 3).cast(F32));
    let h = (x.matmul(&w1) + &b1).relu();
    let loss = h.matmul(&w2).softmax(-1).sparse_categorical_crossentropy(&y).mean_all();
    let params = vec![w1, b1, w2];
    let grads = g.grad_with(&loss, &params.iter().collect::<Vec<_>>(), Disconnected::Raise).unwrap();
    let updates: Vec<(Var, Var)> = params.iter().zip(&grads).map(|(p, d)| (p.clone(), p - 0.1 * d)).collect();
    let f = g.function([&x, &y], [&loss]).updates(updates.iter().map(|(p, u)| (p, u.clone()))).compile(device).unwrap();
    let labels = Array1::from_shape_fn(64, |i| ((i * 7) % 10) as i64);
    let args = vec![random_tensor(&[64, 128], -1.0, 1.0, 5).cast(F32), labels.into()];
    Step { f, params, args }
}

fn values(vars: &[Var]) -> Vec<Tensor> {
    vars.iter().map(|v| v.value().unwrap()).collect()
}

/// A few candidates, so that the emulator (which compiles each program as C++) tunes in seconds.
fn options(folder: &std::path::Path) -> AutotuneOptions {
    AutotuneOptions {
        seconds_per_setting: 0.0,
        min_calls: 1,
        space: Space {
            candidates: ["cuBLAS", "32x32k4/s2", "64x64/s1/p3", "tc32x32/s2/p3/cluster"]
                .map(|l| TileChoice::from_label(l).unwrap())
                .to_vec(),
            ..Space::default()
        },
        cache_folder: Some(folder.to_path_buf()),
        ..AutotuneOptions::default()
    }
}

/// The heading comment of the kernel that computes product `name` in `code` (or its cuBLAS line).
fn how_computed<'a>(code: &'a str, name: &str) -> &'a str {
    let tiled = format!("computes the product of {name} ");
    let blas = format!("{name}: cuBLAS");
    code.lines()
        .find(|l| l.contains(&tiled) || l.contains(&blas))
        .unwrap_or_else(|| panic!("nothing computes {name}:\n{code}"))
}

fn check_report(report: &AutotuneReport, opts: &AutotuneOptions) {
    let names: Vec<&str> = report.products.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names.len(), 2, "{report}");
    assert!(report.outcome.failed.is_empty(), "{report}\n{:?}", report.outcome.failed);
    assert!(!report.outcome.out_of_budget, "{report}");
    // Kiln's own choices, each candidate of each product, and each value of the step's knobs
    // (dependent launch; clusters, cuBLASLt, row tails, longest-first sections, chain joins, quad
    // copies, deep slabs, tensor cores and passes of turns, each on and off; streams, the two
    // bounds, the joins' reach); the best again before the second product and before each of the
    // step's fourteen rounds.
    let space = &opts.space;
    let numbers = space.streams.len() + space.run_macs.len() + space.dot_depth.len() + space.lookahead.len();
    let step = 1 + 9 * 2 + numbers;
    assert_eq!(
        report.outcome.timed + report.outcome.same_code,
        1 + 2 * space.candidates.len() + 1 + step + 14,
        "{report}"
    );
    for choice in report.table().entries.values() {
        assert!(opts.space.candidates.contains(choice), "{report}");
    }
}

#[test]
fn autotune_keeps_the_weights_runs_the_fastest_and_caches_it() {
    for device in kiln::testing::cuda_test_devices() {
        let folder = std::env::temp_dir().join(format!("kiln-autotune-test-{}-{device:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);
        let opts = options(&folder);
        let mut s = step(device);
        let before = values(&s.params);
        let report = s.f.autotune(&s.args, &opts).unwrap();
        println!("{device:?}: {report}");
        assert!(!report.from_cache);
        check_report(&report, &opts);
        assert_eq!(values(&s.params), before, "{device:?}: tuning left the weights changed");

        // Each product is computed as the report says.
        let code = s.f.generated_code();
        for (name, key) in &report.products {
            let line = how_computed(&code, name);
            // A tiled product's line says "(no cuBLAS call)", so a cuBLAS call is told by its own form.
            let on_cublas = line.contains(&format!("{name}: cuBLAS"));
            match report.table().entries.get(key).map(|c| c.label().unwrap()) {
                Some(l) if l == "cuBLAS" => assert!(on_cublas, "{line}"),
                Some(l) => {
                    let shape = l.split('/').next().unwrap();
                    assert!(!on_cublas && line.contains(&format!("in {shape} tiles")), "{l}: {line}");
                }
                None => assert!(!on_cublas, "kiln's own choice tiles it: {line}"),
            }
        }
        assert_eq!(code.contains("griddepcontrol.wait"), report.outcome.setting.dependent_launch, "{report}");

        // A tuned step is the reference's step.
        let mut r = step(Device::Reference);
        let want = r.f.call(&r.args).unwrap();
        let got = s.f.call(&s.args).unwrap();
        assert!(got[0].max_abs_diff(&want[0]) < 1e-5, "{device:?}: loss {got:?} against {want:?}");
        for (p, q) in values(&s.params).iter().zip(values(&r.params)) {
            assert!(p.max_abs_diff(&q) < 1e-5, "{device:?}: the updated weights differ from the reference's");
        }

        // The same step compiled again finds the result in the cache.
        let mut again = step(device);
        let cached = again.f.autotune(&again.args, &opts).unwrap();
        assert!(cached.from_cache, "{cached}");
        assert_eq!(cached.outcome.setting, report.outcome.setting);
        assert_eq!(cached.cache_entry, report.cache_entry);
        assert_eq!(again.f.generated_code(), code);
        std::fs::remove_dir_all(&folder).unwrap();
    }
}

#[test]
fn autotune_is_an_error_off_the_cuda_backend() {
    let mut s = step(Device::Cpu);
    let err = s.f.autotune(&s.args, &AutotuneOptions::default()).unwrap_err().to_string();
    assert!(err.contains("Device::Cuda") && err.contains("Cpu"), "{err}");
}
