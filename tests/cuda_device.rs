//! The CUDA backend's program where it runs: on a GPU, and on the CUDA emulator (its CUDA C run
//! on the CPU). Shared variables stay resident on the device and are copied back only when asked
//! for; `set_value` between calls is seen by the next call (the captured CUDA graph is captured
//! again when a variable's memory moved); two functions sharing variables see each other's
//! updates, also across devices; an index computed by the graph that is out of range is an error;
//! long column reductions split across blocks agree with the CPU, and so do products in tiles and
//! small products with long dots, which are tiled too. Where a device cannot run, each
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

/// The devices that run the CUDA backend's program (the emulator and the GPU, where each can).
fn cuda_devices() -> Vec<Device> {
    kiln::testing::cuda_test_devices()
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
    // Each way of clearing the error word: by the host when a step may have left a code in it
    // (the default), and by a memset inside the step (KILN_CUDA_EGRESS=0).
    for egress in [true, false] {
        kiln_codegen::cuda::with_egress(egress, || computed_indices_with(device));
    }
}

fn computed_indices_with(device: Device) {
    let g = Graph::new();
    let table = g.input("table", F32, [5, 3]);
    let i = g.input("i", I64, [2]);
    let picked = table.take(&(&i * 2), 0);
    let mut f = g.function([&table, &i], [&picked]).compile(device).unwrap();
    let t: Tensor = ndarray::Array2::<f32>::from_shape_fn((5, 3), |(r, c)| (r * 3 + c) as f32).into();
    let expected = Tensor::from(array![[6.0f32, 7.0, 8.0], [12.0, 13.0, 14.0]]);
    // Eager, then captured, then replayed: a bad index is the error of its own call only, and
    // one met in a replay after good calls is still reported.
    for good in [true, false, true, true, false, true] {
        let i: Tensor = if good { array![1i64, 2].into() } else { array![1i64, 3].into() };
        match f.call1(&[t.clone(), i]) {
            Ok(out) if good => assert_eq!(out, expected, "{device:?}"),
            Err(e) if !good => {
                let err = e.to_string();
                assert!(err.contains("out of range") && err.contains("cuda_device.rs"), "{err}");
            }
            other => panic!("{device:?}: a {} call gave {other:?}", if good { "good" } else { "bad" }),
        }
    }
}

#[test]
fn returned_outputs_of_every_kind_come_back() {
    // A loss (a temporary of the step), a matrix the step computes, the same loss twice, an input
    // and a shared variable as they are: the first three come back in one copy with the error
    // word (`readback`), the last two from their own memory.
    for device in cuda_devices() {
        for egress in [true, false] {
            kiln_codegen::cuda::with_egress(egress, || returned_outputs_on(device));
        }
    }
}

fn returned_outputs_on(device: Device) {
    let g = Graph::new();
    let x = g.input("x", F32, [3, 4]);
    let w = g.shared("w", array![1.0f32, 2.0, 3.0, 4.0]);
    let loss = (&x * &w).sum_all();
    let scaled = &x * 2.0 + &w;
    let outs = [&loss, &scaled, &loss, &x, &w];
    let updates = [(&w, &w - 0.25 * x.sum(&[0]))];
    let mut step = g.function([&x], outs).updates(updates.clone()).compile(device).unwrap();
    let mut reference = g.function([&x], outs).updates(updates).compile(Device::Reference).unwrap();
    let arg: Tensor = ndarray::Array2::<f32>::from_shape_fn((3, 4), |(r, c)| (r as f32) - (c as f32) * 0.5).into();
    // Eager, captured, replayed; then the reference from the same start. The variable comes back
    // as it was before each call's update (outputs are computed before any update).
    let on_device: Vec<Vec<Tensor>> = (0..3).map(|_| step.call(&[arg.clone()]).unwrap()).collect();
    w.set_value(array![1.0f32, 2.0, 3.0, 4.0]).unwrap();
    let expected: Vec<Vec<Tensor>> = (0..3).map(|_| reference.call(&[arg.clone()]).unwrap()).collect();
    assert_eq!(expected[0][4], Tensor::from(array![1.0f32, 2.0, 3.0, 4.0]));
    assert_eq!(on_device, expected, "{device:?}");
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
    // One line for the one specialization, then the streams' priorities.
    let stats = step.compile_stats();
    assert_eq!(stats.len(), 2, "{stats:?}");
    assert!(stats[1].starts_with("stream priorities: "), "{stats:?}");
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

#[test]
fn products_in_tiles_with_their_epilogue_agree_with_the_cpu() {
    for device in cuda_devices() {
        tiled_products_on(device);
    }
}

fn tiled_products_on(device: Device) {
    // Products too large for a thread per output and small enough for kiln's tiled kernel, each
    // with an epilogue: edge tiles, the inner dim cut into slices, transposed operands, 64x64 tiles,
    // an in-place update of a shared variable, and an epilogue reading the product transposed
    // (which goes to cuBLAS).
    let g = Graph::new();
    let x = g.input("x", F32, [200, 300]);
    let w = g.input("w", F32, [300, 90]);
    let b = g.input("b", F32, [90]);
    let dense = (x.matmul(&w) + &b).relu();
    let p = g.input("p", F32, [257, 130]);
    let q = g.input("q", F32, [257, 70]);
    let v = g.shared("v", kiln::testing::random_tensor(&[130, 70], -1.0, 1.0, 5).cast(F32));
    let v_new = &v - 0.1 * p.t().matmul(&q);
    let r = g.input("r", F32, [150, 70]);
    let s = g.input("s", F32, [200, 70]);
    let by_transposed = r.matmul(&s.t()).sigmoid();
    let wide_a = g.input("wide_a", F32, [320, 32]);
    let wide_b = g.input("wide_b", F32, [32, 1000]);
    let wide = wide_a.matmul(&wide_b) * 0.5;
    let x2 = g.input("x2", F32, [200, 300]);
    let read_transposed = x2.matmul(&w).t() + 1.0;
    let (big_a, big_b) = (g.input("big_a", F32, [400, 256]), g.input("big_b", F32, [300, 400]));
    let both_transposed = big_a.t().matmul(&big_b.t()).tanh();
    let outputs = [&dense, &by_transposed, &wide, &read_transposed, &both_transposed];
    let build = |device| {
        g.function([&x, &w, &b, &p, &q, &r, &s, &wide_a, &wide_b, &x2, &big_a, &big_b], outputs)
            .updates([(&v, v_new.clone())])
            .compile(device)
            .unwrap()
    };
    let (mut tiled, mut on_cpu) = (build(device), build(Device::Cpu));
    let shapes: [&[usize]; 12] = [
        &[200, 300],
        &[300, 90],
        &[90],
        &[257, 130],
        &[257, 70],
        &[150, 70],
        &[200, 70],
        &[320, 32],
        &[32, 1000],
        &[200, 300],
        &[400, 256],
        &[300, 400],
    ];
    let args: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| kiln::testing::random_tensor(s, -1.0, 1.0, 10 + i as u64).cast(F32))
        .collect();
    let v0 = v.value().unwrap();
    // Twice on the device (the ticket counters are ready again for the second call), then the
    // CPU twice from the same start.
    let on_device: Vec<Vec<Tensor>> = (0..2).map(|_| tiled.call(&args).unwrap()).collect();
    let v_device = v.value().unwrap();
    v.set_value(v0).unwrap();
    for got in &on_device {
        let want = on_cpu.call(&args).unwrap();
        for (o, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a.allclose(b, 1e-4, 1e-4), "output {o} differs by {}", a.max_abs_diff(b));
        }
    }
    let v_cpu = v.value().unwrap();
    assert!(v_device.allclose(&v_cpu, 1e-4, 1e-4), "updates differ by {}", v_device.max_abs_diff(&v_cpu));
    let code = tiled.generated_code();
    assert!(code.contains("(200x300x90) in 32x32k4 tiles, its inner dim in 5 slices"), "{code}");
    // Whole tiles (the slab copies the card allows said after the shape).
    let whole = code.lines().find(|l| l.contains("(320x32x1000) in 32x32k4 tiles")).unwrap_or_default();
    assert!(whole.contains("(no cuBLAS call)") && !whole.contains("slices"), "{code}");
    assert!(code.contains("(256x400x300) in 32x32k4 tiles, its inner dim in 3 slices"), "{code}");
    assert!(code.contains("(130x257x70) in 32x32k4 tiles"), "the update's product is tiled: {code}");
    assert!(code.contains("cuBLAS 200x300 times 300x90"), "a product read transposed goes to cuBLAS: {code}");
}

/// Two products with edge tiles in both dims, one operand read transposed: `relu(x w + b)` and
/// `tanh(x wt^T)` (200x300x190 and 200x300x150), their inputs, outputs and arguments.
fn edge_tile_products() -> (Graph, [Var; 4], [Var; 2], Vec<Tensor>) {
    let g = Graph::new();
    let x = g.input("x", F32, [200, 300]);
    let w = g.input("w", F32, [300, 190]);
    let b = g.input("b", F32, [190]);
    let wt = g.input("wt", F32, [150, 300]);
    let outputs = [(x.matmul(&w) + &b).relu(), x.matmul(&wt.t()).tanh()];
    let args: Vec<Tensor> = [&[200, 300][..], &[300, 190], &[190], &[150, 300]]
        .iter()
        .enumerate()
        .map(|(i, s)| kiln::testing::random_tensor(s, -1.0, 1.0, 40 + i as u64).cast(F32))
        .collect();
    (g, [x, w, b, wt], outputs, args)
}

#[test]
fn every_tile_shape_agrees_with_the_cpu() {
    // Each tile shape, whole and in slices (finished by a ticket, or as a cluster), by float32
    // FMAs and on tensor cores (3xTF32), forced
    // on products with edge tiles in both dims and a transposed operand: the 128x128 tiles reach
    // their epilogue in two bands of rows, the others in one. Half the runs on the emulator's
    // mirrored schedule.
    use kiln_codegen::cuda::emulator::with_mirrored_schedule;
    use kiln_codegen::cuda::{with_tile_choice, TileShape};
    let (g, inputs, outputs, args) = edge_tile_products();
    let build = |device| g.function(&inputs, &outputs).compile(device).unwrap();
    let want = build(Device::Cpu).call(&args).unwrap();
    for device in cuda_devices() {
        for (n, tile) in TileShape::ALL.into_iter().enumerate() {
            for choice in kiln::testing::tile_forms(tile) {
                let (slices, tensor_cores) = (choice.slices.unwrap_or(1), choice.tensor_cores == Some(true));
                let (stages, cluster) = (choice.stages.unwrap_or(1), choice.cluster == Some(true));
                let run = || {
                    with_tile_choice(choice, || {
                        let mut f = build(device);
                        (f.call(&args).unwrap(), f.generated_code())
                    })
                };
                let (got, code) = if (n + slices + stages) % 2 == 0 { with_mirrored_schedule(run) } else { run() };
                let on = if tensor_cores { " on tensor cores (3xTF32)" } else { "" };
                let label = tile.computed_as(tensor_cores).label();
                assert!(code.contains(&format!("in {label} tiles{on}")), "{code}");
                assert_eq!(code.contains("in flight (cp.async)"), stages > 1, "{code}");
                // Asked for, clusters are used where the whole tile fits beside the slabs: always
                // with one slab buffer by FMAs but in 128x128 tiles.
                let clustered = code.contains("__cluster_dims__(");
                assert!(cluster || !clustered, "{code}");
                if cluster && stages == 1 && !tensor_cores && tile != TileShape::T128x128 {
                    assert!(clustered, "{code}");
                }
                for (o, (a, e)) in got.iter().zip(&want).enumerate() {
                    let err = a.max_abs_diff(e);
                    let what = format!(
                        "{device:?} {label} tiles{on}, {slices} slices, {stages} stages, clusters {clustered}, output {o}"
                    );
                    assert!(err < 1e-4, "{what}: {err}");
                }
            }
        }
    }
}

#[test]
fn tensor_core_tiles_keep_float32_accuracy() {
    // fmnist-mlp's first layer (128x784x256, values with full mantissas) against the product in
    // f64: on tensor cores (3xTF32) within eight times the error of float32 FMAs, where a single
    // TF32 product would be off by about 2^-11 of each term (some hundred times more). Each term
    // is three roundings of the accumulator, not one, and the tensor cores' own additions are
    // not IEEE round-to-nearest: an H100 gave 3.1 and 3.8 times the FMAs' error in two tilings
    // (2.7e-5 against 8.7e-6, 3.6e-5 against 9.4e-6).
    use kiln_codegen::cuda::{with_tile_choice, TileChoice};
    let (m, k, n) = (128, 784, 256);
    let g = Graph::new();
    let x = g.input("x", F32, [m, k]);
    let w = g.input("w", F32, [k, n]);
    let out = x.matmul(&w).relu();
    let args = [
        kiln::testing::random_tensor(&[m, k], -1.0, 1.0, 7).cast(F32),
        kiln::testing::random_tensor(&[k, n], -1.0, 1.0, 8).cast(F32),
    ];
    let (xs, ws) = (args[0].to_f64_vec(), args[1].to_f64_vec());
    let want: Vec<f64> =
        (0..m * n).map(|o| (0..k).map(|i| xs[o / n * k + i] * ws[i * n + o % n]).sum::<f64>().max(0.0)).collect();
    for device in cuda_devices() {
        let error = |tensor_cores: bool| {
            let choice = TileChoice { tiled: Some(true), tensor_cores: Some(tensor_cores), ..TileChoice::default() };
            let got = with_tile_choice(choice, || {
                g.function([&x, &w], [&out]).compile(device).unwrap().call(&args).unwrap().remove(0)
            });
            got.to_f64_vec().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
        };
        let (fma, tensor) = (error(false), error(true));
        kiln::testing::note(&format!("{device:?}: largest error {fma:.2e} by FMAs, {tensor:.2e} on tensor cores"));
        assert!(tensor <= 8.0 * fma.max(1e-6), "{device:?}: {tensor} on tensor cores, {fma} by FMAs");
    }
}

#[test]
fn tensor_core_slabs_split_by_the_block_once_copied_give_the_bits_split_where_staged_in_turn_or_ahead() {
    // Through registers each thread splits the words it stages; copied asynchronously the block
    // splits the landed slab into fragment-ordered arrays, in its turn or a turn ahead (into a
    // second split buffer: past 48 KiB, so in dynamic shared memory; within 48 KiB only 128x64
    // tiles have room for it, their epilogue then staged in bands). The same parts multiplied in
    // the same order: the same bits, in every tile shape, whole and in slices, with edge tiles,
    // an operand read transposed and a slice that ends inside a slab.
    use kiln_codegen::cuda::{with_split_ahead, with_tensor_core_shared, with_tile_choice, TileChoice, TileShape};
    let (g, inputs, outputs, args) = edge_tile_products();
    for device in cuda_devices() {
        for tile in [TileShape::T32x32, TileShape::T64x64, TileShape::T128x64, TileShape::T128x128] {
            for slices in [1, 3] {
                let run = |stages, ahead| {
                    let choice = TileChoice { stages: Some(stages), ..TileChoice::forced(tile, slices, true) };
                    with_split_ahead(ahead, || {
                        with_tile_choice(choice, || {
                            let mut f = g.function(&inputs, &outputs).compile(device).unwrap();
                            let got = f.call(&args).unwrap();
                            (got.iter().map(Tensor::to_f64_vec).collect::<Vec<_>>(), f.generated_code())
                        })
                    })
                };
                let (staged, _) = run(1, false);
                let ((in_turn, code), (ahead, ahead_code)) = (run(3, false), run(3, true));
                assert!(code.contains("on tensor cores (3xTF32)") && code.contains("split_a_hi"), "{code}");
                assert!(!code.contains("split_a_hi[sp * "), "{code}");
                assert!(ahead_code.contains(".split_a_hi[sp * "), "{ahead_code}");
                // Past 48 KiB but for sliced 128x64 tiles, whose slices stage no tile (44.5 KiB).
                let sliced_128x64 = tile == TileShape::T128x64 && slices > 1;
                assert_eq!(ahead_code.contains("extern __shared__"), !sliced_128x64, "{ahead_code}");
                let what = format!("{device:?} {} tiles, {slices} slices", tile.label());
                assert!(staged == in_turn, "{what}: the copied slabs' product differs");
                assert!(staged == ahead, "{what}: the slabs split a turn ahead give another product");
                if tile == TileShape::T128x64 {
                    let (within, static_code) = with_tensor_core_shared(48 * 1024, || run(3, true));
                    assert!(static_code.contains("split_a_hi[sp * ") && !static_code.contains("extern __shared__"));
                    assert!(staged == within, "{what}: split ahead within 48 KiB, another product");
                }
            }
        }
    }
}

#[test]
fn slab_turns_in_passes_give_the_bits_of_turns_one_at_a_time() {
    // A pass of turns (`with_turn_passes`: each turn a block whose buffer indices are constants)
    // does each turn's arithmetic in the same order as a loop of single turns: the same bits, by
    // FMAs and on tensor cores, in every tile shape, whole and in slices (a pass then takes a
    // whole slice, and the last slice ends inside a slab), with two, three and eight buffers (as
    // many as fit: past six, no passes).
    use kiln_codegen::cuda::{with_tile_choice, with_turn_passes, TileChoice, TileShape};
    let (g, inputs, outputs, args) = edge_tile_products();
    for device in cuda_devices() {
        for tile in TileShape::ALL {
            for (slices, tensor_cores, stages) in
                [(1, false, 3), (3, false, 2), (1, false, 8), (1, true, 3), (3, true, 3)]
            {
                let choice = TileChoice { stages: Some(stages), ..TileChoice::forced(tile, slices, tensor_cores) };
                let run = |passes| {
                    with_turn_passes(passes, || {
                        with_tile_choice(choice, || {
                            let mut f = g.function(&inputs, &outputs).compile(device).unwrap();
                            let got = f.call(&args).unwrap();
                            (got.iter().map(Tensor::to_f64_vec).collect::<Vec<_>>(), f.generated_code())
                        })
                    })
                };
                let ((single, single_code), (passed, passes_code)) = (run(false), run(true));
                let what =
                    format!("{device:?} {tile:?} tiles, {slices} slices, tensor cores {tensor_cores}, {stages} stages");
                assert!(!single_code.contains("kt_pass"), "{what}: {single_code}");
                assert!(stages > 3 || passes_code.contains("kt_pass +"), "{what}: {passes_code}");
                assert!(single == passed, "{what}: the turns in passes give another product");
            }
        }
    }
}

#[test]
fn small_products_with_long_dots_are_tiled_and_agree_with_the_cpu() {
    // Three products small enough for a thread per output: one with dots 300 long is tiled (its
    // inner dim in slices), one with dots of 40 stays a dot per thread, and one with long dots
    // whose epilogue reduces rows (a softmax, which tiles cannot end in) is not tiled. The large
    // elementwise output keeps the step from running in one block, where nothing is tiled.
    let g = Graph::new();
    let x = g.input("x", F32, [60, 300]);
    let w = g.input("w", F32, [300, 7]);
    let w2 = g.input("w2", F32, [300, 7]);
    let b = g.input("b", F32, [7]);
    let v = g.input("v", F32, [60, 40]);
    let u = g.input("u", F32, [40, 7]);
    let big = g.input("big", F32, [300, 300]);
    let deep = (x.matmul(&w) + &b).sigmoid();
    let shallow = (v.matmul(&u) + &b).relu();
    let deep_softmax = x.matmul(&w2).softmax(-1);
    let doubled = &big * 2.0;
    let shapes: [&[usize]; 7] = [&[60, 300], &[300, 7], &[300, 7], &[7], &[60, 40], &[40, 7], &[300, 300]];
    let args: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| kiln::testing::random_tensor(s, -1.0, 1.0, 40 + i as u64).cast(F32))
        .collect();
    let inputs = [&x, &w, &w2, &b, &v, &u, &big];
    let outputs = [&deep, &shallow, &deep_softmax, &doubled];
    let want = g.function(inputs, outputs).compile(Device::Cpu).unwrap().call(&args).unwrap();
    for device in cuda_devices() {
        let mut f = g.function(inputs, outputs).compile(device).unwrap();
        let got = f.call(&args).unwrap();
        for (o, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!(a.allclose(e, 1e-5, 1e-5), "{device:?} output {o} differs by {}", a.max_abs_diff(e));
        }
        let code = f.generated_code();
        assert!(code.contains("(60x300x7) in 32x32k4 tiles, its inner dim in"), "{code}");
        assert_eq!(code.matches(" tiles, its inner dim in").count(), 1, "only the deep product is tiled: {code}");
        assert!(code.contains("where it reads it"), "the shallow product is a dot per thread: {code}");
    }
}
