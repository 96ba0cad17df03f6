//! Whole training steps on each native backend against the reference backend, step by step: the
//! loss of every step and every parameter (and optimizer state) after the steps. keras-mlp draws
//! dropout masks, which must be the same on every backend (Philox from the same state). On the GPU
//! the first step runs kernel by kernel, the second is captured as a CUDA graph and the rest replay
//! it, so agreement over several steps checks all three paths; parameters are read back from the
//! device only at the end.

use kiln::workloads::build;
use kiln::Device;

fn agree(name: &str, steps: usize, device: Device, tol: f64) {
    let mut native = build(name, device).unwrap();
    let mut reference = build(name, Device::Reference).unwrap();
    for i in 0..steps {
        let a = native.step.call1(&native.args).unwrap().item().unwrap();
        let b = reference.step.call1(&reference.args).unwrap().item().unwrap();
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{name} step {i}: {device:?} {a} vs reference {b}");
    }
    for (p, q) in native.params.iter().zip(&reference.params) {
        let (a, b) = (p.value().unwrap(), q.value().unwrap());
        let err = a.max_abs_diff(&b);
        assert!(err <= tol, "{name} on {device:?}: {} differs by {err}", p.name().unwrap_or_default());
    }
}

/// The CPU backend to 1e-5; the GPU and its emulator (other summation orders in cuBLAS and the
/// reductions) to 1e-4, the emulator also on its mirrored schedule (blocks and threads in the other
/// order: a race between them that one order hides, the other shows).
fn on_every_native_backend(name: &str, steps: usize) {
    for device in kiln::testing::test_devices() {
        match device {
            Device::Reference => {}
            Device::Cpu => agree(name, steps, device, 1e-5),
            Device::Cuda(_) => agree(name, steps, device, 1e-4),
            Device::CudaEmulator => {
                agree(name, steps, device, 1e-4);
                kiln_codegen::cuda::emulator::with_mirrored_schedule(|| agree(name, steps.min(2), device, 1e-4));
            }
        }
    }
}

#[test]
fn fmnist_mlp_ten_steps() {
    on_every_native_backend("fmnist-mlp", 10);
}

#[test]
fn keras_mlp_with_dropout_ten_steps() {
    on_every_native_backend("keras-mlp", 10);
}

#[test]
fn autoencoder_two_steps() {
    on_every_native_backend("autoencoder", 3);
}
