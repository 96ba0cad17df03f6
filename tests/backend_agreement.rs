//! Whole training steps on the CPU backend against the reference backend, step by step: the loss of
//! every step and every parameter (and optimizer state) after ten steps. keras-mlp draws dropout
//! masks, which must be the same on both backends (Philox from the same state).

use kiln::workloads::build;
use kiln::Device;

fn agree(name: &str, steps: usize) {
    let mut cpu = build(name, Device::Cpu).unwrap();
    let mut reference = build(name, Device::Reference).unwrap();
    for i in 0..steps {
        let a = cpu.step.call1(&cpu.args).unwrap().item().unwrap();
        let b = reference.step.call1(&reference.args).unwrap().item().unwrap();
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{name} step {i}: cpu {a} vs reference {b}");
    }
    for (p, q) in cpu.params.iter().zip(&reference.params) {
        let (a, b) = (p.value().unwrap(), q.value().unwrap());
        let err = a.max_abs_diff(&b);
        assert!(err <= 1e-5, "{name}: {} differs by {err}", p.name().unwrap_or_default());
    }
}

#[test]
fn fmnist_mlp_ten_steps() {
    agree("fmnist-mlp", 10);
}

#[test]
fn keras_mlp_with_dropout_ten_steps() {
    agree("keras-mlp", 10);
}

#[test]
fn autoencoder_two_steps() {
    agree("autoencoder", 2);
}
