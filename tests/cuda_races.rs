//! The CUDA backend's training steps under the emulator's race check (`with_race_check`): every
//! load and store of every kernel is checked against CUDA's ordering rules, so a missing
//! `__syncthreads`, two blocks of one launch touching one element, or a last-block protocol
//! without its fence, L2 load or ticket is an error here, whatever order the emulator ran the
//! threads in; so are two steps that no dependency orders touching one byte, one of them writing
//! (what several streams would run at once). Each workload runs one step as the GPU would run it
//! (single-block runs, side-by-side launches, tiled products with their epilogues), kernel by kernel
//! on the mirrored schedule, planned for two streams, and emitted for programmatic dependent
//! launch (each kernel opening with its wait, nothing on the CPU); fmnist-mlp also with every tile shape,
//! whole or sliced, by FMAs (slabs through registers and copied asynchronously) and on tensor
//! cores, and a classifier whose tiled logits run the loss's row pass and the gradient's product
//! in their kernel's tail (`row_tail.rs`) in every tile form, at sizes where the last tile runs
//! past the rows, and a joined kernel whose clustered section follows a longer-running one (its
//! start moved to a cluster's first block). Each loss must match the reference's; a tail's, to
//! the bit, the separate kernels'.

use kiln::workloads::build;
use kiln::Device;
use kiln_codegen::cuda::emulator::{with_mirrored_schedule, with_race_check};
use kiln_codegen::cuda::{
    kernel_by_kernel, with_dependent_launch, with_late_dependent_launch, with_streams, with_tile_choice,
    with_turn_passes, TileChoice, TileShape,
};

fn one_step(name: &str, form: &str) {
    let mut emulated = build(name, Device::CudaEmulator).unwrap();
    let mut reference = build(name, Device::Reference).unwrap();
    let a = match emulated.step.call1(&emulated.args) {
        Ok(loss) => loss.item().unwrap(),
        Err(e) => panic!("{name}{form}: {e}"),
    };
    let b = reference.step.call1(&reference.args).unwrap().item().unwrap();
    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{name}{form}: loss {a} vs reference {b}");
}

/// One step of `name` as the GPU would run it, kernel by kernel on the mirrored schedule, and planned
/// for two streams (memory of its own for every temporary, and the dependencies two streams would
/// follow, which the check between steps holds the kernels' actual accesses to). (Tiles
/// on tensor cores are checked in `every_tile_shape_is_race_free`: the emulator's warp
/// multiply-adds are slow, the autoencoder's step takes minutes with every product on them.)
fn race_free_in_each_form(name: &str) {
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("race check of {name} skipped: {why}"));
        return;
    }
    with_race_check(|| {
        one_step(name, "");
        kernel_by_kernel(|| with_mirrored_schedule(|| one_step(name, " (kernel by kernel, mirrored)")));
        with_streams(2, || one_step(name, " (planned for two streams)"));
        with_dependent_launch(|| one_step(name, " (for programmatic dependent launch)"));
    });
}

#[test]
fn dependent_launch_at_the_end_of_each_block_is_race_free() {
    // KILN_CUDA_PDL=late: each kernel closes with its trigger (nothing in the emulator, as the
    // wait is); the step still runs and agrees with the reference.
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("skipped: {why}"));
        return;
    }
    with_race_check(|| {
        for name in ["keras-mlp", "fmnist-mlp"] {
            with_late_dependent_launch(|| one_step(name, " (dependent launch at the end of each block)"));
        }
    });
}

#[test]
fn keras_mlp_step_is_race_free() {
    race_free_in_each_form("keras-mlp");
}

#[test]
fn fmnist_mlp_step_is_race_free() {
    race_free_in_each_form("fmnist-mlp");
}

#[test]
fn autoencoder_step_is_race_free() {
    race_free_in_each_form("autoencoder");
}

/// fmnist-mlp with every product tiled in each shape, whole and sliced, by FMAs (one slab buffer,
/// or three filled by asynchronous copies, or as many as fit of eight, the staged tile then in the
/// slab buffers where it fits there) and on tensor cores (through registers, or copied and split):
/// the staging, the sliced finish's tickets and the side-by-side launches of each. With three
/// buffers, the slab loop's turns taken one at a time and in passes (`with_turn_passes`: by
/// default on tensor cores only), each turn's buffers then constants.
#[test]
fn every_tile_shape_is_race_free() {
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("race check of the tile shapes skipped: {why}"));
        return;
    }
    for (i, tile) in TileShape::ALL.into_iter().enumerate() {
        let slices = [1, 4, 2, 3, 2][i];
        // By FMAs with one slab buffer, with three filled by asynchronous copies and with up to
        // eight; on tensor cores through registers, and copied and split a turn ahead (in
        // dynamic shared memory, past 48 KiB).
        for (tensor_cores, stages) in [(false, 1), (false, 3), (false, 8), (true, 1), (true, 3)] {
            let passes = if stages == 3 { vec![false, true] } else { vec![tensor_cores] };
            for passes in passes {
                let form = format!(
                    " ({tile:?} tiles in {slices} slices, tensor cores: {tensor_cores}, {stages} stages, passes: {passes})"
                );
                let choice = TileChoice { stages: Some(stages), ..TileChoice::forced(tile, slices, tensor_cores) };
                let step = || with_tile_choice(choice, || one_step("fmnist-mlp", &form));
                with_race_check(|| with_turn_passes(passes, step));
            }
        }
    }
}

/// Unsliced tiles on tensor cores whose slabs are twice their shape's depth where the buffers
/// and the split ahead of the shape's own depth still fit, their epilogue staged in bands within
/// the slab buffers: 128x64 tiles 16 deep with three buffers; 32x32 tiles 64 deep with two (with
/// three and the split ahead, 124 KiB: past an H100's 113 KiB a tile, so by default they keep
/// 32-deep slabs), where the inner dimension takes an even number of 32-deep slabs.
#[test]
fn deep_tensor_core_slabs_are_race_free() {
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("race check of deep tensor-core slabs skipped: {why}"));
        return;
    }
    for (tile, stages, deep) in [(TileShape::T128x64, 3, 16), (TileShape::T32x32, 2, 64)] {
        // The turns one at a time, and in passes (each turn then a block with `kt` its own).
        for (passes, turn) in [(false, format!("kt += {deep})")), (true, format!("kt_pass + {deep};"))] {
            let form = format!(" ({tile:?} tiles whole on tensor cores, {stages} stages, passes: {passes})");
            let choice = TileChoice { stages: Some(stages), ..TileChoice::forced(tile, 1, true) };
            // The form this checks: some product's turns go through slabs of the deeper depth.
            let w = build("fmnist-mlp", Device::Reference).unwrap();
            let src = with_turn_passes(passes, || with_tile_choice(choice, || w.step.cuda_source(&w.args).unwrap()));
            assert!(src.contains(&turn), "{form}: no {deep}-deep slabs in\n{src}");
            let step = || with_tile_choice(choice, || one_step("fmnist-mlp", &form));
            with_race_check(|| with_turn_passes(passes, step));
        }
    }
}

/// The slices of each tile as a thread block cluster, adding their partial tiles through each
/// other's shared memory: race-checked (the cluster barrier between a block's staged tile and the
/// others' reads of it) in each tile shape that stages its whole tile, on both schedules.
#[test]
fn clustered_tiles_are_race_free() {
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("race check of clustered tiles skipped: {why}"));
        return;
    }
    for (tile, slices, tensor_cores, stages) in [
        (TileShape::T32x32K4, 4, false, 1),
        (TileShape::T32x32K4, 7, false, 3),
        (TileShape::T32x32K4, 4, false, 8),
        (TileShape::T64x64, 2, false, 8),
        (TileShape::T32x32, 3, false, 1),
        (TileShape::T64x64, 2, false, 1),
        (TileShape::T32x32, 2, true, 1),
        (TileShape::T64x64, 3, true, 3),
    ] {
        let form =
            format!(" ({tile:?} tiles in a cluster of {slices} slices, tensor cores: {tensor_cores}, {stages} stages)");
        let choice =
            TileChoice { stages: Some(stages), cluster: Some(true), ..TileChoice::forced(tile, slices, tensor_cores) };
        with_race_check(|| with_tile_choice(choice, || one_step("fmnist-mlp", &form)));
        with_tile_choice(choice, || with_mirrored_schedule(|| one_step("fmnist-mlp", &format!("{form}, mirrored"))));
    }
}

/// A cluster adds its slices' partial tiles in the order, and so to the bits, of the ticket's last
/// block: fmnist-mlp's parameters after a step are the same either way.
#[test]
fn clustered_slices_add_up_as_the_ticket_does() {
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("clustered slices skipped: {why}"));
        return;
    }
    let after_a_step = |cluster: bool| {
        let choice = TileChoice { cluster: Some(cluster), ..TileChoice::forced(TileShape::T32x32K4, 4, false) };
        with_tile_choice(choice, || {
            let mut w = build("fmnist-mlp", Device::CudaEmulator).unwrap();
            // (the program is specialized, so its code known, at the first call)
            w.step.call1(&w.args).unwrap();
            let code = w.step.generated_code();
            let clustered = code.contains("__cluster_dims__(4, 1, 1)");
            assert_eq!(clustered, cluster, "clusters asked: {cluster}, in the code: {clustered}");
            w.params.iter().map(|p| p.value().unwrap().to_f64_vec()).collect::<Vec<_>>()
        })
    };
    let (ticket, cluster) = (after_a_step(false), after_a_step(true));
    for (i, (a, b)) in ticket.iter().zip(&cluster).enumerate() {
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "parameter {i}: {differ} of {} values differ", a.len());
    }
}

/// A classifier whose logits' product (100x96x7, so its last tile a few rows short) is tiled,
/// with the loss's row pass and, where a block finishes few enough rows, the gradient's product
/// with the weights at the end of that kernel (`row_tail.rs`): in every form of the tile (whole,
/// sliced with a ticket or a cluster, one to eight slab buffers) race-free, its loss and every
/// gradient the reference's.
#[test]
fn tails_of_tiled_products_are_race_free_where_tiles_run_past_the_rows() {
    use kiln::prelude::*;
    use kiln::testing::{random_tensor, tile_forms};
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("race check of tails skipped: {why}"));
        return;
    }
    let g = Graph::new();
    let x = g.input("x", F32, [100, 800]);
    let y = g.input("y", I64, [100]);
    let w1 = g.shared("w1", random_tensor(&[800, 96], -0.1, 0.1, 1).cast(F32));
    let b1 = g.shared("b1", random_tensor(&[96], -0.1, 0.1, 2).cast(F32));
    let w2 = g.shared("w2", random_tensor(&[96, 7], -0.3, 0.3, 3).cast(F32));
    let b2 = g.shared("b2", random_tensor(&[7], -0.1, 0.1, 4).cast(F32));
    let h = (x.matmul(&w1) + &b1).relu();
    let loss = (h.matmul(&w2) + &b2).softmax(-1).sparse_categorical_crossentropy(&y).mean_all();
    let grads = g.grad_with(&loss, &[&w1, &b1, &w2, &b2], Disconnected::Raise).unwrap();
    let outs: Vec<&Var> = std::iter::once(&loss).chain(&grads).collect();
    let labels: Tensor = ndarray::Array1::from_shape_fn(100, |i| ((i * 3) % 7) as i64).into();
    let args = [random_tensor(&[100, 800], -1.0, 1.0, 5).cast(F32), labels];
    let expected = g.function([&x, &y], outs.clone()).compile(Device::Reference).unwrap().call(&args).unwrap();
    let (mut rows, mut products, mut forms) = (0, 0, 0);
    for tile in [TileShape::T32x32K4, TileShape::T64x64] {
        forms += tile_forms(tile).len();
        for choice in tile_forms(tile) {
            let form = format!("{choice:?}");
            let mut f = g.function([&x, &y], outs.clone()).compile(Device::CudaEmulator).unwrap();
            let got = with_race_check(|| with_tile_choice(choice, || f.call(&args)))
                .unwrap_or_else(|e| panic!("{form}: {e}"));
            let code = f.generated_code();
            rows += code.matches("_row_max on the rows each block finished").count();
            products += code.matches("_fused on the rows each block finished").count();
            for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                assert!(a.allclose(b, 1e-4, 1e-5), "{form}: output {i} differs by {}", a.max_abs_diff(b));
            }
        }
    }
    // The row pass joins every form's logits (a tile spans the 7 classes); the gradient's
    // product (4 rows a block of a cluster of 8, 7 multiply-adds an element) some.
    assert_eq!(rows, forms, "row passes in tails");
    assert!(products > 0, "no form ran the gradient's product in its tail");
}

/// A tail computes each row as the separate kernels would, in the same order: fmnist-mlp's
/// parameters after a step, and its loss, are the same bits with tails and without.
#[test]
fn tails_compute_what_separate_kernels_do_to_the_bit() {
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("tails skipped: {why}"));
        return;
    }
    let after_a_step = |tails: bool| {
        kiln_codegen::cuda::with_row_tails(tails, || {
            let mut w = build("fmnist-mlp", Device::CudaEmulator).unwrap();
            let loss = w.step.call1(&w.args).unwrap().item().unwrap();
            let code = w.step.generated_code();
            assert_eq!(code.contains("on the rows each block finished"), tails, "tails asked: {tails}");
            let params: Vec<Vec<f64>> = w.params.iter().map(|p| p.value().unwrap().to_f64_vec()).collect();
            (loss, params)
        })
    };
    let ((loss_a, apart), (loss_t, tailed)) = (after_a_step(false), after_a_step(true));
    assert_eq!(loss_a.to_bits(), loss_t.to_bits(), "loss {loss_a} apart, {loss_t} in tails");
    for (i, (a, b)) in apart.iter().zip(&tailed).enumerate() {
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "parameter {i}: {differ} of {} values differ", a.len());
    }
}

/// A clustered section of a joined kernel placed after one whose threads do more multiply-adds
/// starts on a cluster's first block, the blocks between running nothing: fmnist-mlp's last
/// kernel with its first layer's weight gradient in 28 tiles of 128x64 (4096 multiply-adds a
/// thread) and the second's in clusters of 3 slices, race-checked on both schedules, compiled by
/// NVRTC where it is found, its parameters after a step the reference's.
#[test]
fn a_clustered_section_after_a_longer_one_starts_on_a_cluster_s_first_block() {
    use kiln_codegen::cuda::{with_tile_table, ProductKey, TileTable};
    if let Some(why) = kiln::testing::emulator_skip_reason() {
        kiln::testing::note(&format!("clustered section after a longer one skipped: {why}"));
        return;
    }
    let mut table = TileTable::default();
    let weight_gradient = |m, n| ProductKey { m, k: 128, n, a_transposed: true, b_transposed: false };
    let whole = TileChoice { stages: Some(3), ..TileChoice::forced(TileShape::T128x64, 1, false) };
    let clustered = TileChoice { cluster: Some(true), ..TileChoice::forced(TileShape::T64x64, 3, false) };
    table.insert(weight_gradient(784, 256), whole).unwrap();
    table.insert(weight_gradient(256, 256), clustered).unwrap();
    let with_table = |f: &mut dyn FnMut()| with_tile_table(table.clone(), f);
    let mut emulated = build("fmnist-mlp", Device::CudaEmulator).unwrap();
    let mut reference = build("fmnist-mlp", Device::Reference).unwrap();
    with_table(&mut || {
        let src = kiln::testing::checked_cuda_source(&emulated.step, &emulated.args).unwrap();
        assert!(src.contains("//   blocks [0, 28): k20_fused\n"), "{src}");
        assert!(src.contains("//   blocks [28, 30): none (a cluster's first block next)\n"), "{src}");
        assert!(src.contains("//   blocks [30, 78): k26_fused\n"), "{src}");
    });
    with_table(&mut || with_race_check(|| one_step("fmnist-mlp", " (a cluster after a longer section)")));
    with_table(&mut || with_mirrored_schedule(|| one_step("fmnist-mlp", " (the same, mirrored)")));
    with_table(&mut || {
        emulated.step.call1(&emulated.args).unwrap();
    });
    reference.step.call1(&reference.args).unwrap();
    for (p, q) in emulated.params.iter().zip(&reference.params) {
        let (a, b) = (p.value().unwrap(), q.value().unwrap());
        assert!(a.allclose(&b, 1e-4, 1e-5), "{:?}: differs by {}", p.name(), a.max_abs_diff(&b));
    }
}
