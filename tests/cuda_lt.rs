//! Products through cuBLASLt (`KILN_CUDA_LT=1`, `with_cublaslt`), with the bias (and ReLU)
//! epilogues it computes: the step list names them and those epilogue kernels are gone; on the CUDA
//! emulator (cuBLASLt's semantics on the host) a training step's loss and parameters are the same
//! bits as with the epilogue kernels, and no two steps race; on a GPU, where there is one, the
//! steps agree with the reference backend. fmnist-mlp's products go to cuBLAS here (tiling off),
//! so that its two hidden layers' products take their epilogues into cuBLASLt. Epilogues it cannot
//! compute (a bias along the columns, a sigmoid) stay kernels, and agree with the reference.

use kiln::workloads::build;
use kiln::Device;
use kiln_codegen::cuda::emulator::with_race_check;
use kiln_codegen::cuda::{with_cublaslt, with_tile_choice, TileChoice};

/// Every float product above the small-product size on cuBLAS.
fn on_cublas<R>(f: impl FnOnce() -> R) -> R {
    with_tile_choice(TileChoice { tiled: Some(false), ..TileChoice::default() }, f)
}

/// The losses of `steps` steps of `name` on `device`, the generated code, and the parameters after.
fn train(name: &str, device: Device, steps: usize, lt: bool) -> (Vec<f64>, String, Vec<Vec<f64>>) {
    with_cublaslt(lt, || {
        let mut w = build(name, device).unwrap();
        let losses = (0..steps).map(|_| w.step.call1(&w.args).unwrap().item().unwrap()).collect();
        let code = if device == Device::Reference { String::new() } else { w.step.generated_code() };
        let params = w.params.iter().map(|p| p.value().unwrap().to_f64_vec()).collect();
        (losses, code, params)
    })
}

#[test]
fn products_in_cublaslt_compute_what_cublas_and_the_epilogue_kernels_do_to_the_bit() {
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("skipped: {why}"));
        return;
    }
    let (kernels, apart_code, apart) = on_cublas(|| train("fmnist-mlp", Device::CudaEmulator, 2, false));
    let (lt, code, fused) = on_cublas(|| with_race_check(|| train("fmnist-mlp", Device::CudaEmulator, 2, true)));
    // Every product on cuBLAS goes to cuBLASLt; the two hidden layers' relu(x w + b) in its
    // epilogue, their kernels gone.
    let listing = &code[..code.find("\n\n").unwrap_or(code.len())];
    assert_eq!(listing.matches(": cuBLASLt ").count(), 5, "{listing}");
    assert!(!listing.contains(": cuBLAS "), "{listing}");
    assert_eq!(listing.matches("in its epilogue (no ").count(), 2, "{listing}");
    assert!(!code.contains("k1_fused(") && apart_code.contains("k1_fused("), "{}", &code[..code.len().min(3000)]);
    assert_eq!(
        kernels.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        lt.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "losses {kernels:?} with epilogue kernels, {lt:?} in cuBLASLt"
    );
    for (i, (a, b)) in apart.iter().zip(&fused).enumerate() {
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "parameter {i}: {differ} of {} values differ", a.len());
    }
    // Without the request, nothing changes.
    let (_, default_code, _) =
        on_cublas(|| with_cublaslt(false, || train("fmnist-mlp", Device::CudaEmulator, 1, false)));
    assert!(!default_code.contains("cuBLASLt"));
}

#[test]
fn products_in_cublaslt_agree_with_the_reference_on_a_gpu() {
    if let Some(why) = kiln::testing::cuda_skip_reason() {
        kiln::testing::note(&format!("skipped, no usable GPU: {why}"));
        return;
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
    for (name, cublas_only) in [("fmnist-mlp", true), ("fmnist-mlp-4k", false)] {
        let run = |device| {
            if cublas_only {
                on_cublas(|| train(name, device, 3, true))
            } else {
                train(name, device, 3, true)
            }
        };
        let (gpu, code, _) = run(Device::Cuda(0));
        let (reference, _, _) = train(name, Device::Reference, 3, false);
        assert!(code.contains("cuBLASLt"), "{name}: no product took its epilogue");
        for (step, (a, b)) in gpu.iter().zip(&reference).enumerate() {
            assert!(close(*a, *b), "{name} step {step}: loss {a} on the GPU, {b} on the reference");
        }
    }
}

/// Epilogues cuBLASLt cannot compute stay kernels after its product: a bias along the columns
/// (`[m, 1]`), a sigmoid; beside them a plain `relu(x w + b)` takes its epilogue into cuBLASLt.
/// All agree with the reference on the emulator.
#[test]
fn epilogues_cublaslt_cannot_take_stay_kernels() {
    use kiln::prelude::*;
    use kiln::testing::random_tensor;
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("skipped: {why}"));
        return;
    }
    let g = Graph::new();
    let x = g.input("x", F32, [128, 256]);
    let weight = |seed| g.shared("w", random_tensor(&[256, 64], -0.2, 0.2, seed).cast(F32));
    let (w1, w2, w3) = (weight(1), weight(2), weight(3));
    let b = g.shared("b", random_tensor(&[64], -0.1, 0.1, 4).cast(F32));
    let c = g.shared("c", random_tensor(&[128, 1], -0.1, 0.1, 5).cast(F32));
    let outs = [(x.matmul(&w1) + &b).relu(), (x.matmul(&w2) + &c).relu(), (x.matmul(&w3) + &b).sigmoid()];
    let args = vec![random_tensor(&[128, 256], -1.0, 1.0, 6).cast(F32)];
    let want = g.function([&x], outs.iter()).compile(Device::Reference).unwrap().call(&args).unwrap();
    on_cublas(|| {
        with_cublaslt(true, || {
            let mut f = g.function([&x], outs.iter()).compile(Device::CudaEmulator).unwrap();
            let got = f.call(&args).unwrap();
            let code = f.generated_code();
            let listing = &code[..code.find("\n\n").unwrap_or(code.len())];
            assert_eq!(listing.matches(": cuBLASLt ").count(), 3, "{listing}");
            assert_eq!(listing.matches("in its epilogue").count(), 1, "{listing}");
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(a.allclose(b, 1e-5, 1e-5), "output {i}: {} apart", a.max_abs_diff(b));
            }
        })
    });
}
