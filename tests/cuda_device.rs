//! The CUDA backend's program where it runs: on a GPU, and on the CUDA emulator (its CUDA C run
//! on the CPU). Shared variables stay resident on the device and are copied back only when asked
//! for; `set_value` between calls is seen by the next call (the captured CUDA graph is captured
//! again when a variable's memory moved); two functions sharing variables see each other's
//! updates, also across devices; an index computed by the graph that is out of range is an error;
//! long column reductions split across blocks agree with the CPU. Where a device cannot run, each
//! test says why and goes on with the others.

#![allow(clippy::cloned_ref_to_slice_refs)]

use kiln::prelude::*;
use kiln::testing::cuda_skip_reason;

fn gpu() -> bool {
    match cuda_skip_reason() {
        None => true,
        Some(why) => {
            kiln::testing::note(&format!("skipped, no usable GPU: {why}"));
            false
        }
    }
}

/// The devices that run the CUDA backend's program: the GPU and the CUDA emulator, where each can
/// run (each one that cannot says why).
fn cuda_devices() -> Vec<Device> {
    let mut d = vec![];
    match kiln::testing::emulator_skip_reason() {
        None => d.push(Device::CudaEmulator),
        Some(why) => kiln::testing::note(&format!("emulator skipped: {why}")),
    }
    if gpu() {
        d.push(Device::Cuda(0));
    }
    d
}

#[test]
fn shared_variables_stay_resident_and_read_back_on_demand() {
    for device in cuda_devices() {
        shared_variables_on(device);
    }
}

fn shared_variables_on(device: Device) {
    let g = Graph::new();
    let x = g.input("x", F32, [4]);
    let w = g.shared("w", array![1.0f32, 2.0, 3.0, 4.0]);
    let mut step = g.function([&x], [&(&w * &x).sum_all()]).updates([(&w, &w - 0.5 * &x)]).compile(device).unwrap();
    let mut cpu = g.function([&x], [&(&w * &x).sum_all()]).updates([(&w, &w - 0.5 * &x)]).compile(Device::Cpu).unwrap();
    let arg: Tensor = array![1.0f32, 1.0, 2.0, 2.0].into();
    // Three calls: eager, captured, replayed.
    let losses: Vec<f64> = (0..3).map(|_| step.call1(&[arg.clone()]).unwrap().item().unwrap()).collect();
    assert_eq!(losses, vec![17.0, 12.0, 7.0]);
    assert_eq!(w.value().unwrap(), Tensor::from(array![-0.5f32, 0.5, 0.0, 1.0]));
    // set_value moves the variable: the next call uses the new value (graph captured again).
    w.set_value(array![1.0f32, 1.0, 1.0, 1.0]).unwrap();
    assert_eq!(step.call1(&[arg.clone()]).unwrap().item().unwrap(), 6.0);
    assert_eq!(step.call1(&[arg.clone()]).unwrap().item().unwrap(), 1.0);
    // A CPU function sharing the variable sees the GPU's updates, and the GPU sees the CPU's.
    assert_eq!(cpu.call1(&[arg.clone()]).unwrap().item().unwrap(), -4.0);
    assert_eq!(step.call1(&[arg.clone()]).unwrap().item().unwrap(), -9.0);
    assert_eq!(w.value().unwrap(), Tensor::from(array![-1.0f32, -1.0, -3.0, -3.0]));
}

#[test]
fn computed_indices_out_of_range_are_errors() {
    for device in cuda_devices() {
        computed_indices_on(device);
    }
}

fn computed_indices_on(device: Device) {
    let g = Graph::new();
    let table = g.input("table", F32, [5, 3]);
    let i = g.input("i", I64, [2]);
    let picked = table.take(&(&i * 2), 0);
    let mut f = g.function([&table, &i], [&picked]).compile(device).unwrap();
    let t: Tensor = ndarray::Array2::<f32>::from_shape_fn((5, 3), |(r, c)| (r * 3 + c) as f32).into();
    let ok = f.call1(&[t.clone(), array![1i64, 2].into()]).unwrap();
    assert_eq!(ok, Tensor::from(array![[6.0f32, 7.0, 8.0], [12.0, 13.0, 14.0]]));
    let err = f.call1(&[t, array![1i64, 3].into()]).unwrap_err().to_string();
    assert!(err.contains("out of range") && err.contains("cuda_device.rs"), "{err}");
}

#[test]
fn generated_code_is_the_cuda_c_with_update_notes() {
    if !gpu() {
        return;
    }
    let w = kiln::workloads::build("fmnist-mlp", Device::Cuda(0)).unwrap();
    let mut step = w.step;
    step.call(&w.args).unwrap();
    let code = step.generated_code();
    assert!(code.contains("update of shared variable") && code.contains("extern \"C\" __global__"), "{code}");
    assert_eq!(code, step.generated_code());
    assert_eq!(step.compile_stats().len(), 1);
}

#[test]
fn long_column_reductions_split_across_blocks_agree_with_the_cpu() {
    for device in cuda_devices() {
        long_column_reductions_on(device);
    }
}

fn long_column_reductions_on(device: Device) {
    // 4096 rows of 300 columns: few output tiles, long rows, so each tile's rows are cut into
    // slices reduced by separate blocks and combined by the last one (with the update after it).
    let g = Graph::new();
    let x = g.input("x", F32, [4096, 300]);
    let v = g.shared("v", Tensor::zeros(F32, &[300]));
    let col_sum = (&x * 2.0).sum(&[0]);
    let col_max = x.max(&[0]);
    let v_new = &v * 0.9 - 0.01 * &col_sum;
    let build = |device| g.function([&x], [&col_sum, &col_max]).updates([(&v, v_new.clone())]).compile(device).unwrap();
    let (mut on_gpu, mut on_cpu) = (build(device), build(Device::Cpu));
    let arg = kiln::testing::random_tensor(&[4096, 300], -1.0, 1.0, 3).cast(F32);
    for _ in 0..3 {
        let a = on_gpu.call(std::slice::from_ref(&arg)).unwrap();
        let b = on_cpu.call(std::slice::from_ref(&arg)).unwrap();
        assert!(a[0].allclose(&b[0], 1e-5, 1e-3), "sums differ by {}", a[0].max_abs_diff(&b[0]));
        assert_eq!(a[1], b[1]);
    }
    assert!(on_gpu.generated_code().contains("tickets"), "the split form was used");
    // six momentum updates (three on each device) of the same column sums
    let s = on_cpu.call(std::slice::from_ref(&arg)).unwrap()[0].to_f64_vec();
    let factor = -0.01 * (1.0 - 0.9f64.powi(7)) / (1.0 - 0.9);
    for (got, s) in v.value().unwrap().to_f64_vec().iter().zip(&s) {
        assert!((got - factor * s).abs() <= 1e-4 * (1.0 + s.abs()), "{got} vs {}", factor * s);
    }
}

#[test]
fn long_rows_split_across_blocks_agree_with_the_cpu() {
    for device in cuda_devices() {
        long_rows_on(device);
    }
}

fn long_rows_on(device: Device) {
    // Three rows of 50,000 and a mean over all 150,000: few rows, long ones, so each row is cut
    // into slices reduced by separate blocks and combined by the last one (with the update after).
    let g = Graph::new();
    let x = g.input("x", F32, [3, 50_000]);
    let v = g.shared("v", Tensor::zeros(F32, &[3]));
    let row_sum = (&x * &x).sum(&[1]);
    let row_min = x.min(&[1]);
    let mean = x.mean_all();
    let v_new = &v * 0.5 + &row_sum;
    let build =
        |device| g.function([&x], [&row_sum, &row_min, &mean]).updates([(&v, v_new.clone())]).compile(device).unwrap();
    let (mut split, mut on_cpu) = (build(device), build(Device::Cpu));
    let arg = kiln::testing::random_tensor(&[3, 50_000], -1.0, 1.0, 4).cast(F32);
    for _ in 0..2 {
        let a = split.call(std::slice::from_ref(&arg)).unwrap();
        let b = on_cpu.call(std::slice::from_ref(&arg)).unwrap();
        assert!(a[0].allclose(&b[0], 1e-5, 1e-3), "sums differ by {}", a[0].max_abs_diff(&b[0]));
        assert_eq!(a[1], b[1]);
        assert!(a[2].allclose(&b[2], 1e-5, 1e-6), "means differ by {}", a[2].max_abs_diff(&b[2]));
    }
    assert!(split.generated_code().contains("tickets"), "the split form was used");
    // v = 0.5 v + s, five times (two calls on each device, one more on the CPU): s (2 - 1/16)
    let s = on_cpu.call(std::slice::from_ref(&arg)).unwrap()[0].to_f64_vec();
    for (got, s) in v.value().unwrap().to_f64_vec().iter().zip(&s) {
        assert!((got - 1.9375 * s).abs() <= 1e-5 * (1.0 + s.abs()), "{got} vs {}", 1.9375 * s);
    }
}
