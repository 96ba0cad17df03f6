//! The CUDA backend without a GPU: snapshots of the CUDA C it prints for canonical graphs (a fused
//! elementwise chain, a softmax, reductions by row and by column, a product with its bias + relu
//! epilogue, an SGD momentum update; dropout on a small batch, whose whole step becomes one
//! single-block kernel), NVRTC compilation of every kernel of the benchmark
//! workloads and tile shapes (wherever libnvrtc is found) and ptxas's report of their resources,
//! the compiled-code caches, and the error `Device::Cuda` gives where the machine has no GPU.

use kiln::prelude::*;
use kiln::testing::{check_cuda_source_compiles, checked_cuda_source, random_tensor};

fn f32s(shape: &[usize], seed: u64) -> Tensor {
    random_tensor(shape, -1.0, 1.0, seed).cast(F32)
}

/// The CUDA C of `f` for `args`, after checking that NVRTC compiles it (where libnvrtc exists).
fn cuda_c(f: &Function, args: &[Tensor]) -> String {
    // `kiln::testing`'s, unwrapped.
    checked_cuda_source(f, args).unwrap()
}

#[test]
fn fused_elementwise_chain() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n"), 64.into()]);
    let y = g.input("y", F32, [Dim::sym("n"), 64.into()]);
    let z = ((&x * 2.0 + 1.0).tanh() * &y).exp();
    let f = g.function([&x, &y], [&z]).compile(Device::Reference).unwrap();
    // Large enough for the kernel-per-step form (small steps run as one single-block kernel).
    insta::assert_snapshot!(cuda_c(&f, &[f32s(&[2048, 64], 1), f32s(&[2048, 64], 2)]));
}

#[test]
fn softmax() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n"), 10.into()]);
    let f = g.function([&x], [&x.softmax(-1)]).compile(Device::Reference).unwrap();
    insta::assert_snapshot!(cuda_c(&f, &[f32s(&[8192, 10], 3)]));
}

#[test]
fn reductions_by_row_and_by_column() {
    let g = Graph::new();
    let x = g.input("x", F32, [512, 300]);
    let rows = x.max(&[1]);
    let cols = (&x * &x).sum(&[0]);
    let f = g.function([&x], [&rows, &cols]).compile(Device::Reference).unwrap();
    // The two are independent: one kernel, its blocks split between them (the tile's 32x8 threads
    // read from the flat block); run on the emulator too.
    insta::assert_snapshot!(cuda_c(&f, &[f32s(&[512, 300], 4)]));
    emulated_agrees(&g, &[&x], &[&rows, &cols], &[f32s(&[512, 300], 4)]);
}

#[test]
fn matmul_with_bias_and_relu_epilogue() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 784.into()]);
    let w = g.shared("w", f32s(&[784, 256], 5));
    let b = g.shared("b", f32s(&[256], 6));
    let h = (x.matmul(&w) + &b).relu();
    let f = g.function([&x], [&h]).compile(Device::Reference).unwrap();
    insta::assert_snapshot!(cuda_c(&f, &[f32s(&[128, 784], 7)]));
}

#[test]
fn sgd_momentum_update() {
    let g = Graph::new();
    let grad = g.input("grad", F32, [784, 256]);
    let p = g.shared("p", f32s(&[784, 256], 8));
    let v = g.shared("v", Tensor::zeros(F32, &[784, 256]));
    let v_new = &v * 0.9 - 0.01 * &grad;
    let f = g
        .function([&grad], Vec::<&Var>::new())
        .updates([(&p, &p + &v_new), (&v, v_new)])
        .compile(Device::Reference)
        .unwrap();
    insta::assert_snapshot!(cuda_c(&f, &[f32s(&[784, 256], 9)]));
}

#[test]
fn dropout() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n"), 64.into()]);
    let rng = g.rng(7);
    let f = g.function([&x], [&x.dropout(0.5, &rng)]).compile(Device::Reference).unwrap();
    insta::assert_snapshot!(cuda_c(&f, &[f32s(&[16, 64], 10)]));
}

#[test]
fn every_workload_compiles_with_nvrtc() {
    for name in kiln::workloads::NAMES {
        let w = kiln::workloads::build(name, Device::Reference).unwrap();
        let src = w.step.cuda_source(&w.args).unwrap();
        assert!(src.contains("extern \"C\" __global__"), "{name}");
        check_cuda_source_compiles(&w.step, &w.args).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn kernels_name_their_graph_nodes_and_call_sites() {
    let w = kiln::workloads::build("fmnist-mlp", Device::Reference).unwrap();
    let src = w.step.cuda_source(&w.args).unwrap();
    assert!(src.contains("k0_matmul") || src.contains("runs as the epilogue of k0_matmul"), "{src}");
    assert!(src.contains("computes softmax_cross_entropy") && src.contains("src/workloads.rs:"), "{src}");
    // The same program prints the same text.
    assert_eq!(src, w.step.cuda_source(&w.args).unwrap());
}

#[test]
fn compiled_code_is_cached_in_memory_and_on_disk() {
    use kiln_codegen::cuda::nvrtc::{compile_with_cache, Origin};
    if !kiln_codegen::cuda::nvrtc::available() {
        kiln::testing::note(&format!("skipped: {}", kiln_codegen::cuda::nvrtc::missing_reason()));
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-ptx-test-{}", std::process::id()));
    let src = format!("extern \"C\" __global__ void probe_{}(float* x) {{ x[0] = 1.0f; }}\n", std::process::id());
    // PTX for a virtual architecture (with the NUL that cuModuleLoadData reads to), machine code
    // (an ELF cubin) for a real one, as the runtime asks.
    let (ptx, origin) = compile_with_cache(&src, "compute_90", Some(dir.clone())).unwrap();
    assert_eq!(origin, Origin::Compiled);
    assert!(String::from_utf8_lossy(&ptx).contains(".entry") && ptx.ends_with(&[0]));
    assert_eq!(compile_with_cache(&src, "compute_90", Some(dir.clone())).unwrap().1, Origin::Memory);
    let (cubin, origin) = compile_with_cache(&src, "sm_90", Some(dir.clone())).unwrap();
    assert_eq!((origin, &cubin[..4]), (Origin::Compiled, &b"\x7fELF"[..]));
    let files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for ending in [".ptx", ".cubin", ".cu"] {
        assert!(files.iter().any(|f| f.ends_with(ending)), "{ending}: {files:?}");
    }
    // PTX stored without its NUL (as an earlier kiln did) is read back with it.
    let ptx_file = files.iter().find(|f| f.ends_with(".ptx")).unwrap();
    std::fs::write(dir.join(ptx_file), &ptx[..ptx.len() - 1]).unwrap();
    assert_eq!(kiln_codegen::cuda::nvrtc::read_disk_cache(&src, "compute_90", &dir).as_deref(), Some(&ptx[..]));
    // What a fresh process (no memory cache) would load.
    assert_eq!(
        kiln_codegen::cuda::nvrtc::read_disk_cache(&src, "sm_90", &dir).as_deref(),
        Some(&cubin[..]),
        "the cubin is on disk"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cuda_device_errors_clearly_where_it_cannot_run() {
    let g = Graph::new();
    let x = g.input("x", F32, [3]);
    match kiln::Device::cuda_unavailable_reason() {
        Some(why) => {
            let err = g.function([&x], [&x.exp()]).compile(Device::Cuda(0)).err().expect("no silent CPU fallback");
            let msg = err.to_string();
            assert!(msg.contains("Device::Cuda(0) is not available") && msg.contains(&why), "{msg}");
        }
        None => {
            let err = g.function([&x], [&x.exp()]).compile(Device::Cuda(999)).err().expect("no such device");
            assert!(err.to_string().contains("CUDA device(s)"), "{err}");
        }
    }
}

// A graph on the CUDA emulator against the reference (where a C++ compiler is found).
use kiln::testing::emulated_agrees;

#[test]
fn small_products_are_computed_inside_their_epilogue() {
    // A product small enough for kiln's own kernel, with a bias + relu epilogue: one kernel.
    let g = Graph::new();
    let x = g.input("x", F32, [16, 32]);
    let w = g.shared("w", f32s(&[32, 8], 11));
    let b = g.shared("b", f32s(&[8], 12));
    let h = (x.matmul(&w) + &b).relu();
    let f = g.function([&x], [&h]).compile(Device::Reference).unwrap();
    let args = [f32s(&[16, 32], 13)];
    let src = cuda_c(&f, &args);
    assert!(src.contains("computes the product of") && !src.contains("_matmul("), "{src}");
    emulated_agrees(&g, &[&x], &[&h], &args);
    // The product's result is also returned: it keeps its own kernel.
    let p = x.matmul(&w);
    let h = (&p + &b).tanh();
    let f = g.function([&x], [&h, &p]).compile(Device::Reference).unwrap();
    let src = cuda_c(&f, &args);
    assert!(src.contains("k0_matmul computes matmul") && !src.contains("computes the product of"), "{src}");
    emulated_agrees(&g, &[&x], &[&h, &p], &args);
}

#[test]
fn runs_of_tiny_kernels_become_one_single_block_kernel() {
    // keras-mlp's step is tiny kernels only (a few hundred elements each): one block runs them all,
    // a section each.
    let w = kiln::workloads::build("keras-mlp", Device::Reference).unwrap();
    let src = w.step.cuda_source(&w.args).unwrap();
    assert!(src.contains("k_step runs the whole step in one block"), "{src}");
    assert_eq!(src.matches("extern \"C\" __global__").count(), 1, "{src}");
    // Between larger kernels, a run of tiny ones is one block: after a product with no epilogue
    // (cuBLAS's), a loss's row pass over [256, 10] and its mean.
    let g = Graph::new();
    let x = g.input("x", F32, [256, 1024]);
    let y = g.input("y", I64, [256]);
    let w = g.shared("w", f32s(&[1024, 10], 2));
    let loss = x.tanh().matmul(&w).softmax(-1).sparse_categorical_crossentropy(&y).mean_all();
    let labels: Tensor = ndarray::Array1::from_shape_fn(256, |i| (i % 10) as i64).into();
    let args = [f32s(&[256, 1024], 1), labels];
    let src = g.function([&x, &y], [&loss]).compile(Device::Reference).unwrap().cuda_source(&args).unwrap();
    assert!(src.contains("k2_run runs 3 kernels in one block"), "{src}");
    assert!(src.contains("section 2: k7_mean computes mean"), "{src}");
    emulated_agrees(&g, &[&x, &y], &[&loss], &args);
}

#[test]
fn groups_over_a_tiled_products_rows_run_at_the_end_of_its_kernel() {
    // fmnist-mlp: the logits' product is tiled, a tile as wide as the 10 classes. At the end of
    // that kernel each block goes on with the rows it finished (`row_tail.rs`): the loss's row
    // pass (a thread per row: row maximum, sum of exponentials, its log, the loss, the softmax,
    // the row sum of the targets and the gradient, each following the one before), then the
    // gradient's product with the layer's weights (10 multiply-adds an element) and the relu
    // mask, past the loss's mean (which only the caller reads, and which then runs beside the
    // next gradient product). The steps are checked on the emulator (with its race check) and the GPU
    // by tests/backend_agreement.rs and tests/cuda_races.rs.
    let w = kiln::workloads::build("fmnist-mlp", Device::Reference).unwrap();
    let src = w.step.cuda_source(&w.args).unwrap();
    assert!(src.contains("k5_fused then runs k7_row_max on the rows each block finished"), "{src}");
    assert!(src.contains("k5_fused then runs k16_fused on the rows each block finished"), "{src}");
    assert!(src.contains("k16_fused computes the product of k15_matmul where it reads it"), "{src}");
    assert!(src.contains("k11_mean_and_k18_k28_k32"), "{src}");
    for merged in ["k8_row_sumexp", "k10_softmax_cross_entropy", "k12_softmax", "k13_sum", "k14_fused"] {
        assert!(src.contains(&format!("(merged {merged})")), "{merged}\n{src}");
    }
    // The whole step: 5 kernels (two layers' tiled products with bias and relu, the third
    // layer's with its tail, then the next gradient product beside the loss's mean, the last
    // layer's weight gradient and a bias gradient, then the other weight gradients, bias
    // gradients and updates). With `KILN_CUDA_CLUSTERS_FIRST=1`, as before, the product joined
    // nothing placed before it unless it started on a cluster's first block: 6 kernels.
    assert_eq!(src.matches("extern \"C\" __global__").count(), 5, "{src}");
    let before = kiln_codegen::cuda::with_clusters_first(true, || w.step.cuda_source(&w.args).unwrap());
    assert!(before.contains("k11_mean_and_k28_k34"), "{before}");
    assert_eq!(before.matches("extern \"C\" __global__").count(), 6, "{before}");
    // At batch 4096 the row pass joins the product's 128 whole tiles (32 rows each); the
    // gradient's product would be 320 multiply-adds a thread there (32 x 256 x 10 a block), more
    // than a thread of its own kernel does (`DOT_DEPTH`), and stays apart, as does the
    // autoencoder's next layer after its 30-wide code (8 x 250 x 30 a block).
    let w = kiln::workloads::build("fmnist-mlp-4k", Device::Reference).unwrap();
    let src = w.step.cuda_source(&w.args).unwrap();
    assert!(src.contains("k5_fused then runs k7_row_max on the rows each block finished"), "{src}");
    assert!(!src.contains("k7_row_max(") && !src.contains("then runs k16"), "{src}");
    let w = kiln::workloads::build("autoencoder", Device::Reference).unwrap();
    let src = w.step.cuda_source(&w.args).unwrap();
    assert!(!src.contains("then runs"), "{src}");
    // KILN_CUDA_ROW_TAIL=0 keeps every group a kernel of its own (timed against this on a GPU by
    // scripts/gpu-check.sh).
}

/// The CUDA C of `relu(x w)` (512x784x256) in each tile shape and each of its forms
/// (`kiln::testing::tile_forms`): the shape, the slices and the source. `inside` runs with each choice in force (where the program is
/// specialized, so tiled).
fn every_tile_shape(
    mut inside: impl FnMut(&Function, &[Tensor]),
) -> Vec<(kiln_codegen::cuda::TileShape, usize, String)> {
    use kiln_codegen::cuda::{with_tile_choice, TileShape};
    let g = Graph::new();
    let x = g.input("x", F32, [512, 784]);
    let w = g.input("w", F32, [784, 256]);
    let f = g.function([&x, &w], [&x.matmul(&w).relu()]).compile(Device::Reference).unwrap();
    let args = [f32s(&[512, 784], 1), f32s(&[784, 256], 2)];
    let mut out = vec![];
    for tile in TileShape::ALL {
        for choice in kiln::testing::tile_forms(tile) {
            let slices = choice.slices.unwrap_or(1);
            let src = with_tile_choice(choice, || {
                inside(&f, &args);
                f.cuda_source(&args).unwrap()
            });
            out.push((tile, slices, src));
        }
    }
    out
}

#[test]
fn every_tile_shape_compiles_with_nvrtc() {
    // The tiled product in each of its shapes, whole and in slices (kiln only picks 128x64 and
    // 128x128 tiles when asked; the product benchmark asks on a GPU).
    let sources = every_tile_shape(|f, args| {
        check_cuda_source_compiles(f, args).unwrap();
    });
    for (tile, slices, src) in sources {
        let label = tile.computed_as(src.contains("on tensor cores")).label();
        assert!(src.contains(&format!("in {label} tiles")), "{src}");
        assert_eq!(src.contains("slices"), slices > 1, "{src}");
    }
}

/// The CUDA C of every workload step (as kiln emits it, on tensor cores, with slabs copied
/// asynchronously into three buffers and into up to eight, for programmatic dependent launch,
/// with clusters) and of every tile shape in each of its forms, each named.
fn every_generated_source() -> Vec<(String, String)> {
    use kiln_codegen::cuda::{with_tile_choice, TileChoice};
    let mut sources = vec![];
    // Each workload as kiln emits it, and with every product that has an epilogue tiled on tensor
    // cores (what KILN_CUDA_TF32X3=1 KILN_CUDA_TILED_MACS=2^30 give; keras-mlp's step is one
    // single-block kernel either way).
    let on_tensor_cores = TileChoice { tiled: Some(true), tensor_cores: Some(true), ..TileChoice::default() };
    for name in kiln::workloads::NAMES {
        let w = kiln::workloads::build(name, Device::Reference).unwrap();
        sources.push((name.to_string(), w.step.cuda_source(&w.args).unwrap()));
        let src = with_tile_choice(on_tensor_cores, || w.step.cuda_source(&w.args).unwrap());
        assert_eq!(src.contains("on tensor cores"), name != "keras-mlp", "{name}: {src}");
        // Their larger slabs cost no launch: side-by-side sections overlap their shared memory.
        let launches =
            |src: &str| src.lines().take_while(|l| l.starts_with("//")).filter(|l| l.starts_with("//   k")).count();
        assert!(launches(&src) <= launches(&sources.last().unwrap().1), "{name}: {src}");
        sources.push((format!("{name} on tensor cores"), src));
        // As kiln emits it by default (for sm_90): slabs copied asynchronously into three buffers,
        // every sliced tile's slices a thread block cluster.
        let default = &sources[sources.len() - 2].1;
        assert_eq!(default.contains("in flight (cp.async)"), name != "keras-mlp", "{name}: {default}");
        assert_eq!(default.contains("__cluster_dims__("), name != "keras-mlp", "{name}: {default}");
        // And for older cards: without clusters (compute capability 8.0), and without either
        // (7.5: the next slab through registers, partial tiles through scratch memory).
        let src = kiln_codegen::cuda::with_target_arch("sm_80", || w.step.cuda_source(&w.args).unwrap());
        assert_eq!(src.contains("in flight (cp.async)"), name != "keras-mlp", "{name}: {src}");
        assert!(!src.contains("__cluster_dims__("), "{name}: {src}");
        sources.push((format!("{name} for sm_80"), src));
        // On tensor cores there, the split's high part rounded by integer arithmetic (`cvt.rn` to
        // TF32 needs 9.0, where the sources above convert with it).
        if name != "keras-mlp" {
            let tc_80 = || with_tile_choice(on_tensor_cores, || w.step.cuda_source(&w.args).unwrap());
            let src = kiln_codegen::cuda::with_target_arch("sm_80", tc_80);
            let tc_90 = &sources[sources.len() - 2].1;
            assert!(tc_90.contains("cvt.rn.tf32.f32") && !src.contains("cvt.rn.tf32.f32"), "{name}: {src}");
            sources.push((format!("{name} on tensor cores for sm_80"), src));
        }
        let src = kiln_codegen::cuda::with_target_arch("sm_75", || w.step.cuda_source(&w.args).unwrap());
        assert!(!src.contains("cp.async") && !src.contains("__cluster_dims__("), "{name}: {src}");
        sources.push((format!("{name} for sm_75"), src));
        // And with as many as fit of eight (KILN_CUDA_STAGES=8: a slice's slabs all in flight).
        let deep = TileChoice { stages: Some(8), ..TileChoice::default() };
        let src = with_tile_choice(deep, || w.step.cuda_source(&w.args).unwrap());
        assert_eq!(src.contains("in flight (cp.async)"), name != "keras-mlp", "{name}: {src}");
        sources.push((format!("{name} with up to 7 slabs in flight"), src));
        // And emitted for programmatic dependent launch (KILN_CUDA_PDL=1): every kernel opens
        // with the grid-dependency wait.
        let src = kiln_codegen::cuda::with_dependent_launch(|| w.step.cuda_source(&w.args).unwrap());
        let kernels = src.matches("extern \"C\" __global__").count();
        assert_eq!(src.matches(") {\n    kiln_dependent_launch();\n").count(), kernels, "{name}: {src}");
        assert!(src.contains("asm volatile(\"griddepcontrol.wait;\" :  :  : \"memory\");"), "{src}");
        sources.push((format!("{name} for programmatic dependent launch"), src));
        // And letting the next kernel launch at the end of each block (KILN_CUDA_PDL=late):
        // every kernel opens with the wait alone and closes with the trigger.
        let src = kiln_codegen::cuda::with_late_dependent_launch(|| w.step.cuda_source(&w.args).unwrap());
        assert_eq!(src.matches(") {\n    kiln_dependent_launch();\n").count(), kernels, "{name}: {src}");
        assert_eq!(src.matches("    kiln_launch_dependents();\n}\n").count(), kernels, "{name}: {src}");
        assert_eq!(src.matches("griddepcontrol.launch_dependents;").count(), 1, "{name}: {src}");
        sources.push((format!("{name} for dependent launch at the end of each block"), src));
        // And with each sliced tile's slices as a thread block cluster and the next slab through
        // registers (KILN_CUDA_CLUSTERS=1 KILN_CUDA_STAGES=1), kiln's estimate then cutting at
        // most 8 slices.
        let clustered = TileChoice { cluster: Some(true), stages: Some(1), ..TileChoice::default() };
        let src = with_tile_choice(clustered, || w.step.cuda_source(&w.args).unwrap());
        assert_eq!(src.contains("__cluster_dims__("), name != "keras-mlp", "{name}: {src}");
        assert!(!src.contains(" slices (no cuBLAS call)"), "{name}: a sliced tile not in a cluster: {src}");
        sources.push((format!("{name} with clusters, one slab buffer"), src));
    }
    for (tile, slices, src) in every_tile_shape(|_, _| {}) {
        sources.push((format!("{} tiles, {slices} slices", tile.label()), src));
    }
    sources
}

#[test]
fn generated_kernels_neither_spill_registers_nor_crowd_out_a_second_block() {
    // What ptxas reports for each kernel of every workload step and of every tile shape: a spill
    // (registers stored to local memory) or a stack frame would make a kernel wait on memory, and
    // more than 128 registers a thread would leave room for only one 256-thread block an SM. A
    // spill of a few words is let pass only where the machine code shows it outside every loop
    // (nvdisasm: values kept across the loop over the slabs, a store and a load each a block,
    // where ptxas held a side-by-side kernel to 64 or 80 registers for four or three blocks an SM).
    use kiln_codegen::cuda::nvrtc::{available, compile, kernel_resources, missing_reason, CHECK_ARCH};
    use kiln_codegen::cuda::sass;
    if !available() {
        kiln::testing::note(&format!("skipped: {}", missing_reason()));
        return;
    }
    let sources = every_generated_source();
    for (what, src) in &sources {
        let kernels = kernel_resources(src, CHECK_ARCH).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!kernels.is_empty(), "{what}: no ptxas report");
        // Except the 128x128 tiles on tensor cores (never picked unless asked): their 64
        // accumulators and fragments take about 150 registers, one block of 8 warps an SM, as
        // GEMM libraries run such tiles (bounding them to 128 spills).
        let most = if what.starts_with("128x128") && src.contains("128x128 tiles on tensor cores") { 168 } else { 128 };
        // The machine code's loops, read once a source, where a kernel of it spills.
        let mut machine_loops = None;
        for k in kernels {
            if k.spill_stores + k.spill_loads + k.stack_frame > 0 {
                assert!(k.spill_stores <= 32 && k.spill_loads <= 32 && k.stack_frame <= 32, "{what}: {k:?}");
                if sass::nvdisasm().is_some() {
                    let loops: &Vec<sass::Loop> = machine_loops.get_or_insert_with(|| {
                        let cubin = compile(src, CHECK_ARCH).unwrap_or_else(|e| panic!("{what}: {e}")).0;
                        sass::loops(&cubin).unwrap_or_else(|e| panic!("{what}: {e}"))
                    });
                    let spilling = loops.iter().filter(|l| l.kernel == k.name && l.spills > 0).count();
                    assert_eq!(spilling, 0, "{what}: {k:?}, spilling in {spilling} loops");
                } else {
                    kiln::testing::note(&format!("{what}: {k:?} not read in the machine code: nvdisasm not found"));
                }
            }
            assert!(k.registers > 0 && k.registers <= most, "{what}: {k:?}");
            assert!(k.shared_bytes <= 48 * 1024, "{what}: {k:?}");
        }
    }
}

#[test]
fn every_workloads_compilation_units_compile_with_only_the_helpers_they_call() {
    // What the runtime compiles (`nvrtc::compile_module`): each step cut into units of whole
    // kernels, each unit with only the helpers its kernels call; with slabs copied asynchronously,
    // sliced tiles as clusters and for programmatic dependent launch, where kernels call helpers.
    use kiln_codegen::cuda::nvrtc::{available, compile_module, missing_reason, CHECK_ARCH};
    use kiln_codegen::cuda::{with_dependent_launch, with_late_dependent_launch, with_tile_choice, TileChoice};
    if !available() {
        kiln::testing::note(&format!("skipped: {}", missing_reason()));
        return;
    }
    let staged = TileChoice { stages: Some(3), cluster: Some(true), ..TileChoice::default() };
    for name in kiln::workloads::NAMES {
        let w = kiln::workloads::build(name, Device::Reference).unwrap();
        let module = || with_tile_choice(staged, || w.step.cuda_module(&w.args).unwrap());
        for module in [with_dependent_launch(module), with_late_dependent_launch(module)] {
            let (parts, _) = compile_module(&module, CHECK_ARCH).unwrap_or_else(|e| panic!("{name}: {e}"));
            let kernels: usize = parts.iter().map(|p| p.kernels.len()).sum();
            assert_eq!(kernels, module.kernels.len(), "{name}");
        }
    }
}

#[test]
fn tiles_load_before_they_multiply_and_before_they_store() {
    // In the machine code of every workload step and tile shape (`every_generated_source`):
    // - each loop over a tile's slabs issues its global loads and asynchronous copies before its
    //   first multiply-add (in a pass of turns, each turn's before its own), so that memory is
    //   read while the slab is multiplied (ptxas once placed the next slab's loads after the
    //   multiply-adds in some kernels: `tiled.rs`);
    // - each kernel that computes tiles walks its tiles' elements loading first and storing last:
    //   no global load of a walk's turn comes after one of its stores (an element at a time, an
    //   in-place update's next element waited for the one before: `tile_finish.rs`).
    // Needs libnvrtc and nvdisasm (pip's nvidia-cuda-nvdisasm).
    use kiln_codegen::cuda::nvrtc::{available, compile, missing_reason, CHECK_ARCH};
    use kiln_codegen::cuda::sass;
    if !available() {
        kiln::testing::note(&format!("skipped: {}", missing_reason()));
        return;
    }
    if sass::nvdisasm().is_none() {
        kiln::testing::note("skipped: nvdisasm not found (pip package nvidia-cuda-nvdisasm, or $NVDISASM)");
        return;
    }
    let (mut slab_loops, mut walks) = (0, 0);
    for (what, src) in every_generated_source() {
        let cubin = compile(&src, CHECK_ARCH).unwrap_or_else(|e| panic!("{what}: {e}")).0;
        let loops = sass::loops(&cubin).unwrap();
        for l in loops.iter().filter(|l| l.is_slab_loop()) {
            slab_loops += 1;
            assert!(l.loads_lead_each_turn(), "{what}: {}", l.describe());
        }
        let tiled: std::collections::HashSet<&str> =
            loops.iter().filter(|l| l.is_slab_loop()).map(|l| l.kernel.as_str()).collect();
        // A tile's walk reads the tile from shared memory; an elementwise section beside the tile's
        // in the same kernel (a weight update) reads none.
        for l in loops.iter().filter(|l| tiled.contains(l.kernel.as_str()) && l.is_storing_walk() && l.shared_loads > 0)
        {
            walks += 1;
            assert_eq!(l.loads_after_a_store, 0, "{what}: {l:?}");
        }
    }
    // (A cluster's block walks only its share of a tile's rows, often in one turn: no loop.)
    assert!(slab_loops > 100 && walks > 50, "{slab_loops} loops over slabs and {walks} walks over tiles found");
}

#[test]
fn weight_gradients_run_beside_the_input_gradients_of_the_layers_before_them() {
    // The autoencoder's backward pass is a chain of eight input-gradient products; each layer's
    // weight gradient (and update, in its epilogue) needs only that layer's output gradient, and
    // moves up (`side.rs`: up to 64 steps) to run beside a later product of the chain that does
    // not read the weights it updates, where it does not hold that product up: not where its
    // threads do more multiply-adds than the product's, and not into the step's last kernel when
    // it was ready mid-chain. Those run on the other stream instead, in kernels of their own: the
    // decoder's two middle layers' together, the last layer's alone (its 128x64 tiles would
    // lower the other kernel's register budget into a second wave).
    let w = kiln::workloads::build("autoencoder", Device::Reference).unwrap();
    let listing = |src: &str| src[..src.find("\n\n").unwrap_or(src.len())].to_string();
    let kernels = |src: &str| src.matches("extern \"C\" __global__").count();
    let src = w.step.cuda_source(&w.args).unwrap();
    // The loss's mean (a split reduction, which only the caller reads) runs beside the chain's
    // first product, in clusters of 7, which takes the first blocks (before, it joined only
    // where it started on a cluster's first block in step order: not after the mean's 25).
    for joined in [
        "k17_fused_mean_and_k21_k64:",
        "k23_fused_and_k60:",
        "k25_fused_and_k56:",
        "k27_fused_and_k52:",
        "k33_fused_and_k40_k43:",
        "k35_fused_and_k36_k39:",
        "k55_fused_and_k59:",
        "k63_fused:",
    ] {
        assert!(listing(&src).contains(joined), "{joined}\n{}", listing(&src));
    }
    assert_eq!(kernels(&src), 18, "{}", listing(&src));
    // The last kernel: the first two layers' weight gradients, the longest-running first.
    assert!(
        src.contains("//   blocks [0, 112): k35_fused\n") && src.contains("//   blocks [112, 240): k39_fused\n"),
        "{src}"
    );
    // Letting every launch join the kernels of the chain, as before: the code layer's 16-block
    // product then ran beside the last layer's weight gradient, 4096 multiply-adds a thread.
    let chained = kiln_codegen::cuda::with_chain_joins(true, || w.step.cuda_source(&w.args).unwrap());
    for joined in ["k25_fused_and_k56_k59:", "k27_fused_and_k52_k55_k63:", "k35_fused_and_k36_k39:"] {
        assert!(listing(&chained).contains(joined), "{joined}\n{}", listing(&chained));
    }
    assert_eq!(kernels(&chained), 16, "{}", listing(&chained));
    // At a lookahead of 12, as before that, the decoder's weight gradients ran at the end.
    let before = kiln_codegen::cuda::with_chain_joins(true, || {
        kiln_codegen::cuda::with_bound("KILN_CUDA_LOOKAHEAD", 12, || w.step.cuda_source(&w.args).unwrap())
    });
    assert_eq!(kernels(&before), 17);
    // On one stream nothing runs beside the chain: every launch that can join a kernel does.
    let one_stream = kiln_codegen::cuda::with_streams(1, || w.step.cuda_source(&w.args).unwrap());
    assert_eq!(listing(&one_stream), listing(&chained));
}

#[test]
fn compile_options_fix_row_tails_joined_sections_joins_tensor_cores_and_passes() {
    // What `Function::autotune` finds is applied through `CompileOptions`: each knob must change
    // the code as its environment variable would, whatever the environment says.
    use kiln_codegen::{cuda::with_compile_options, CompileOptions};
    let kernels = |src: &str| src.matches("extern \"C\" __global__").count();
    let auto = kiln::workloads::build("autoencoder", Device::Reference).unwrap();
    let source = |w: &kiln::workloads::Workload, opts: CompileOptions| {
        with_compile_options(&opts, || w.step.cuda_source(&w.args).unwrap())
    };
    let chained =
        |lookahead| CompileOptions { lookahead: Some(lookahead), chain_joins: Some(true), ..CompileOptions::default() };
    assert_eq!(kernels(&source(&auto, chained(12))), 17);
    assert_eq!(kernels(&source(&auto, chained(64))), 16);
    let short_chain = source(&auto, CompileOptions { chain_joins: Some(false), ..CompileOptions::default() });
    assert_eq!(kernels(&short_chain), 18);
    // fmnist-mlp-4k's last layer's 4096-deep weight gradient: beside the relu mask that the first
    // layer's weight gradient waits for, or at the end of the other stream beside an update.
    let wide = kiln::workloads::build("fmnist-mlp-4k", Device::Reference).unwrap();
    let joins = |on| source(&wide, CompileOptions { chain_joins: Some(on), ..CompileOptions::default() });
    assert!(joins(true).contains("k18_fused_and_k28_k32:"), "{}", joins(true));
    let (short, long) = (joins(false), joins(true));
    assert!(short.contains("k18_fused_and_k28:") && short.contains("k26_fused_and_k32:"), "{short}");
    assert_eq!(kernels(&short), kernels(&long));
    // The last kernel's sections: its two weight gradients first (the larger of them first), or
    // in step order, the bias gradient before the second weight gradient.
    let chained = |longest_first| CompileOptions { longest_first: Some(longest_first), ..CompileOptions::default() };
    let longest_first = source(&auto, chained(true));
    assert!(longest_first.contains("//   blocks [0, 112): k35_fused\n//"), "{longest_first}");
    assert!(longest_first.contains("//   blocks [112, 240): k39_fused\n//"), "{longest_first}");
    let step_order = source(&auto, chained(false));
    assert!(step_order.contains("//   blocks [0, 112): k35_fused\n//"), "{step_order}");
    assert!(step_order.contains("//   blocks [112, 144): k36_sum\n//"), "{step_order}");
    // fmnist-mlp's logits kernel takes its loss's row pass and the next product as tails, or not.
    let mlp = kiln::workloads::build("fmnist-mlp", Device::Reference).unwrap();
    let tails = source(&mlp, CompileOptions { row_tails: Some(true), ..CompileOptions::default() });
    let no_tails = source(&mlp, CompileOptions { row_tails: Some(false), ..CompileOptions::default() });
    assert!(tails.contains("then runs k7_row_max on the rows each block finished"), "{tails}");
    assert!(!no_tails.contains("on the rows each block finished"), "{no_tails}");
    assert!(kernels(&no_tails) > kernels(&tails), "{no_tails}");
    // Tiles on tensor cores or by FMAs, each tile's turns in passes or one at a time.
    let on_tensor_cores = |on| source(&mlp, CompileOptions { tensor_cores: Some(on), ..CompileOptions::default() });
    let (tc, fma) = (on_tensor_cores(true), on_tensor_cores(false));
    assert_eq!(tc, kiln_codegen::cuda::with_tensor_cores(true, || mlp.step.cuda_source(&mlp.args).unwrap()));
    assert!(tc.contains("in 32x32 tiles on tensor cores (3xTF32)"), "{tc}");
    assert!(!fma.contains("on tensor cores") && fma.contains("in 32x32k4 tiles"), "{fma}");
    let passes = "// The slabs' turns in passes of";
    assert!(tc.contains(passes) && !fma.contains(passes), "{fma}");
    let in_passes = |on| CompileOptions { turn_passes: Some(on), ..CompileOptions::default() };
    assert!(source(&mlp, in_passes(true)).contains(passes));
    let single = CompileOptions { tensor_cores: Some(true), ..in_passes(false) };
    assert!(!source(&mlp, single).contains(passes));
}

#[test]
fn rows_are_read_and_written_sixteen_bytes_at_a_time_beside_a_broadcast_bias() {
    // Over [1024, 128] (past the 65,536 elements a single block takes): a bias broadcast along the rows is
    // read as float4s like the rows; a column broadcast along each row is one float a quad; a
    // transposed operand (stride 1024 along the row) leaves the kernel an element at a time. Each
    // agrees with the reference on the emulator (which faults a misaligned float4).
    let g = Graph::new();
    let x = g.input("x", F32, [1024, 128]);
    let column = g.input("column", F32, [1024, 1]);
    let t = g.input("t", F32, [128, 1024]);
    let b = g.shared("b", f32s(&[128], 21));
    let args = [f32s(&[1024, 128], 22), f32s(&[1024, 1], 23), f32s(&[128, 1024], 24)];
    let kernel_of = |out: &Var| {
        let f = g.function([&x, &column, &t], [out]).compile(Device::Reference).unwrap();
        emulated_agrees(&g, &[&x, &column, &t], &[out], &args);
        let src = cuda_c(&f, &args);
        src[src.find("extern \"C\" __global__").expect("a kernel")..].to_string()
    };
    let dense = kernel_of(&(&x + &b).relu());
    assert!(dense.contains("u < 32768;"), "{dense}");
    assert!(dense.contains("reinterpret_cast<const float4*>(in0)[i0 * 32 + i1]"), "{dense}");
    assert!(dense.contains("reinterpret_cast<const float4*>(in1)[i1]"), "{dense}");
    assert!(dense.contains("reinterpret_cast<float4*>(out)[i0 * 32 + i1] = make_float4("), "{dense}");
    let scaled = kernel_of(&(&x * &column).tanh());
    assert!(scaled.contains("reinterpret_cast<const float4*>(in0)[i0 * 32 + i1]"), "{scaled}");
    assert!(scaled.contains("const float x1 = in1[i0];"), "{scaled}");
    let crossed = kernel_of(&(&x + t.permute(&[1, 0])).relu());
    assert!(!crossed.contains("float4"), "{crossed}");
}

#[test]
fn a_threads_walk_over_a_short_row_is_unrolled_so_its_loads_go_out_together() {
    // A bias gradient's column sum over a batch of 128 (32x8 threads a tile: 16 rows a thread,
    // every thread all of them), a loss's mean over a whole batch (split rows: up to 16 a thread,
    // each checked against the slice's end) and row sums of 1000 (a block a row: up to 4 a
    // thread; 128 rows, too many elements for the one-block form). Each thread's walk is unrolled
    // whole; each agrees with the reference on the emulator. In the machine code (pip's nvdisasm
    // 13.2) a thread issues 11 loads before its first add in the column sum, 6 in the mean and
    // all 4 in a row sum; each loop began with a remainder loop of a load a turn (up to 3 round
    // trips to memory, before a part unrolled by 16, 8 or 4), which the mean's and the row sums'
    // threads of fewer turns went through.
    let g = Graph::new();
    let x = g.input("x", F32, [128, 784]);
    let y = g.input("y", F32, [128, 1000]);
    let columns = x.sum(&[0]);
    let mean = (&x * &x).mean(&[0, 1]);
    let rows = y.sum(&[1]);
    let args = [f32s(&[128, 784], 91), f32s(&[128, 1000], 92)];
    emulated_agrees(&g, &[&x, &y], &[&columns, &mean, &rows], &args);
    let source = |out: &Var| {
        let f = g.function([&x, &y], [out]).compile(Device::Reference).unwrap();
        cuda_c(&f, &args)
    };
    let column_sum = source(&columns);
    let walk = "#pragma unroll\n";
    assert!(column_sum.contains(walk) && column_sum.contains("const int r = (int)ty + turn * 8;"), "{column_sum}");
    assert!(!column_sum.contains("if (r < 128)"), "{column_sum}");
    let whole_mean = source(&mean);
    assert!(whole_mean.contains("for (int turn = 0; turn < 16; turn += 1)"), "{whole_mean}");
    assert!(whole_mean.contains("if (r < hi)"), "{whole_mean}");
    let row_sums = source(&rows);
    assert!(row_sums.contains("for (int turn = 0; turn < 4; turn += 1)"), "{row_sums}");
    assert!(row_sums.contains("if (r < 1000)"), "{row_sums}");

    use kiln_codegen::cuda::nvrtc::{available, compile, CHECK_ARCH};
    use kiln_codegen::cuda::sass;
    if !available() || sass::nvdisasm().is_none() {
        kiln::testing::note("machine code not read: libnvrtc or nvdisasm (pip's nvidia-cuda-nvdisasm) not found");
        return;
    }
    let ahead = sass::loads_ahead_of(&compile(&column_sum, CHECK_ARCH).unwrap().0, "DADD").unwrap();
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    assert!(ahead[0].1 >= 5, "{ahead:?}: the loads go out a few at a time");
    println!("a column sum's thread issues {} loads before its first add", ahead[0].1);
}
