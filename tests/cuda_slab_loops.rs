//! The loops over a tile's slabs as NVRTC and ptxas leave them: which bounds a turn checks, which
//! copies move 16 bytes, how a thread's later words are addressed and how deep a slab is; each
//! agreeing with the reference on the emulator, and each measured in the machine code where
//! pip's nvdisasm is found (instructions a turn spends besides its multiply-adds).

use kiln::prelude::*;
use kiln::testing::{checked_cuda_source, emulated_agrees, random_tensor};

fn f32s(shape: &[usize], seed: u64) -> Tensor {
    random_tensor(shape, -1.0, 1.0, seed).cast(F32)
}

/// The CUDA C of `f` for `args`, after checking that NVRTC compiles it (where libnvrtc exists).
fn cuda_c(f: &Function, args: &[Tensor]) -> String {
    checked_cuda_source(f, args).unwrap()
}

/// The machine code's first loop over a tile's slabs in `src`, or `None` (with a note) where
/// libnvrtc or nvdisasm is missing.
fn first_slab_loop(src: &str) -> Option<kiln_codegen::cuda::sass::Loop> {
    use kiln_codegen::cuda::nvrtc::{available, compile, missing_reason, CHECK_ARCH};
    use kiln_codegen::cuda::sass;
    if !available() {
        kiln::testing::note(&format!("machine code not read: {}", missing_reason()));
        return None;
    }
    if sass::nvdisasm().is_none() {
        kiln::testing::note(
            "machine code not read: nvdisasm not found (pip package nvidia-cuda-nvdisasm, or $NVDISASM)",
        );
        return None;
    }
    let loops = sass::loops(&compile(src, CHECK_ARCH).unwrap().0).unwrap();
    Some(loops.into_iter().find(|l| l.is_slab_loop()).expect("a loop over slabs"))
}

#[test]
fn a_slab_loop_checks_only_the_bounds_its_words_can_pass() {
    // The autoencoder's first layer, sigmoid(x w + b) with x [128, 784] and w [784, 1000]: in
    // 64x64 tiles its rows are whole tiles and its inner dim whole 16-deep slabs, so a turn copies
    // x's quad unchecked and checks only w's columns (1000 is no multiple of 64). An inner dim
    // of 250 (32x32 tiles in four groups of threads, unsliced, so 64-deep slabs; x's words one a
    // copy, 250 being no multiple of four) leaves a short last slab: a turn copies unchecked
    // unless the slab it fills is that one.
    // Each agrees with the reference on the emulator; in the machine code (pip's nvdisasm 13.2),
    // the first layer's turn spends 0.14 instructions a multiply-add besides its shared loads and
    // copies (both operands' slabs 16 bytes a copy); 0.18 with x's a word a copy, 0.30 with
    // every copy a word (KILN_CUDA_QUAD_COPIES=0); with every bound checked, 0.39, and 0.54 when
    // the turn's buffer was also computed from `kt` (a division and a remainder) rather than
    // counted round.
    let turn = |k: usize| {
        let g = Graph::new();
        let x = g.input("x", F32, [128, k]);
        let w = g.input("w", F32, [k, 1000]);
        let b = g.input("b", F32, [1000]);
        let out = (x.matmul(&w) + &b).sigmoid();
        let args = [f32s(&[128, k], 31), f32s(&[k, 1000], 32), f32s(&[1000], 33)];
        emulated_agrees(&g, &[&x, &w, &b], &[&out], &args);
        let f = g.function([&x, &w, &b], [&out]).compile(Device::Reference).unwrap();
        let src = cuda_c(&f, &args);
        let turn = &src[src.find("for (int kt = k_lo;").expect("a loop over slabs")..];
        let turn = turn[..turn.find("kiln_cp_async_commit();").expect("the turn's copies")].to_string();
        (src, turn)
    };
    let (whole, whole_turn) = turn(784);
    assert!(whole.contains("in 64x64 tiles"), "{whole}");
    assert_eq!(whole_turn.matches("kiln_cp_async16(tile_a").count(), 1, "{whole_turn}");
    assert_eq!(whole_turn.matches("(int)a_kk0)), true);").count(), 1, "{whole_turn}");
    assert!(!whole_turn.contains("a_in") && !whole_turn.contains(": k_hi - 1"), "{whole_turn}");
    assert!(whole_turn.contains("const bool b_in0 = col0 + (int)b_r0 < 1000;"), "{whole_turn}");
    let (_, short_turn) = turn(250);
    assert!(short_turn.contains("if (kt + 64 + 64 <= k_hi) {"), "{short_turn}");
    assert_eq!(short_turn.matches("kiln_cp_async4(tile_a").count(), 16, "{short_turn}");
    assert_eq!(short_turn.matches("const bool a_in0 = kt + 64 + (int)a_kk0 < k_hi;").count(), 1, "{short_turn}");
    let Some(slab_loop) = first_slab_loop(&whole) else { return };
    let others = slab_loop.instructions - slab_loop.multiply_adds - slab_loop.shared_loads - slab_loop.loads.len();
    let per_multiply_add = others as f64 / slab_loop.multiply_adds as f64;
    assert!(per_multiply_add <= 0.17, "{per_multiply_add:.2} others a multiply-add: {slab_loop:?}");
    println!("the first layer's turn: {per_multiply_add:.2} other instructions a multiply-add");
}

#[test]
fn slabs_contiguous_along_the_tiles_side_are_copied_sixteen_bytes_at_a_time() {
    // A weight gradient, x^T dz with x [128, 784] and dz [128, 256]: both operands run along the
    // tile's side (x^T read as [k, m]), so each thread copies a slab's words four at a time; with
    // dz [128, 250] (rows that are no multiple of four floats) dz's words go one at a time. Each
    // agrees with the reference on the emulator (which faults a copy off a 16-byte boundary), with
    // quad copies and without (KILN_CUDA_QUAD_COPIES=0); in the machine code, a turn issues a
    // quarter of the copies and fewer instructions.
    use kiln_codegen::cuda::with_quad_copies;
    let as_set = |n: usize| {
        let g = Graph::new();
        let x = g.input("x", F32, [128, 784]);
        let dz = g.input("dz", F32, [128, n]);
        let out = (x.t().matmul(&dz) * 0.5).tanh();
        let args = [f32s(&[128, 784], 41), f32s(&[128, n], 42)];
        emulated_agrees(&g, &[&x, &dz], &[&out], &args);
        let f = g.function([&x, &dz], [&out]).compile(Device::Reference).unwrap();
        cuda_c(&f, &args)
    };
    let source = |n: usize, quads: bool| with_quad_copies(quads, || as_set(n));
    let (quads, words) = (source(256, true), source(256, false));
    assert!(quads.contains("kiln_cp_async16(tile_a") && quads.contains("kiln_cp_async16(tile_b"), "{quads}");
    assert!(!words.contains("kiln_cp_async16(tile_"), "{words}");
    // The same through `CompileOptions` (what `Function::autotune` applies), whatever the
    // environment says.
    let with_options = |quads| {
        let opts = kiln_codegen::CompileOptions { quad_copies: Some(quads), ..Default::default() };
        kiln_codegen::cuda::with_compile_options(&opts, || as_set(256))
    };
    assert_eq!((with_options(true), with_options(false)), (quads.clone(), words.clone()));
    let ragged = source(250, true);
    assert!(ragged.contains("kiln_cp_async16(tile_a") && !ragged.contains("kiln_cp_async16(tile_b"), "{ragged}");
    let (Some(by_quads), Some(by_words)) = (first_slab_loop(&quads), first_slab_loop(&words)) else { return };
    assert_eq!(by_quads.loads.len() * 4, by_words.loads.len(), "{by_quads:?}\n{by_words:?}");
    assert!(by_quads.instructions < by_words.instructions, "{by_quads:?}\n{by_words:?}");
    println!("a turn of x^T dz: {} instructions by quads, {} by words", by_quads.instructions, by_words.instructions);
}

/// The CUDA C of `tanh(dz w^T)` with dz [128, 500] and w [1000, 500] (the autoencoder's second
/// layer's input gradient: both operands run along the slab), after checking it on the emulator.
fn input_gradient_source() -> String {
    let g = Graph::new();
    let dz = g.input("dz", F32, [128, 500]);
    let w = g.input("w", F32, [1000, 500]);
    let out = dz.matmul(&w.t()).tanh();
    let args = [f32s(&[128, 500], 51), f32s(&[1000, 500], 52)];
    emulated_agrees(&g, &[&dz, &w], &[&out], &args);
    let f = g.function([&dz, &w], [&out]).compile(Device::Reference).unwrap();
    cuda_c(&f, &args)
}

/// Instructions a multiply-add in `src`'s first loop over slabs besides its shared loads and
/// copies, or `None` where the machine code cannot be read.
fn others_a_multiply_add(src: &str) -> Option<f64> {
    let slab_loop = first_slab_loop(src)?;
    let others = slab_loop.instructions - slab_loop.multiply_adds - slab_loop.shared_loads - slab_loop.loads.len();
    Some(others as f64 / slab_loop.multiply_adds as f64)
}

#[test]
fn a_threads_later_slab_words_are_placed_by_a_step_from_its_first() {
    // The input gradient dz w^T, its slabs copied a word at a time (KILN_CUDA_QUAD_COPIES=0): each
    // thread stages four words of each operand a slab, 16 rows apart for every thread. Those
    // words are declared as steps from the first, so that ptxas shares their address arithmetic:
    // a turn (both arms of the last-slab check counted; pip's nvdisasm 13.2) spends 0.47
    // instructions a multiply-add besides its shared loads and copies, where it spent 0.61 with
    // each word's place computed from the thread's index. It agrees with the reference on the
    // emulator.
    let src = kiln_codegen::cuda::with_quad_copies(false, input_gradient_source);
    assert!(src.contains("in 64x64 tiles"), "{src}");
    for side in ["a", "b"] {
        assert!(src.contains(&format!("const int {side}_r1 = {side}_r0 + 16;")), "{src}");
        assert!(src.contains(&format!("const int {side}_kk3 = {side}_kk0;")), "{src}");
    }
    let Some(per_multiply_add) = others_a_multiply_add(&src) else { return };
    assert!(per_multiply_add <= 0.50, "{per_multiply_add:.2} others a multiply-add");
    println!("a turn of dz w^T by words: {per_multiply_add:.2} other instructions a multiply-add");
}

#[test]
fn left_operands_contiguous_along_the_slab_are_copied_sixteen_bytes_at_a_time() {
    // A layer's input x [m, k] (and an input gradient's dz) runs along the slab: where k is a
    // multiple of four, each thread copies a quad of a row a slab, the slab is staged a row of
    // the tile after another, and the multiply-adds read a thread's rows as a float4 of four
    // steps. Each form agrees with the reference on the emulator: rows past the last tile (100)
    // and a short last slab (500 = 31 slabs of 16 and 4), 64x64 tiles and 32x32 tiles in thread
    // groups; 250 (no multiple of four) stays a word a copy, as does w^T of dz w^T (the right
    // operand: its threads read four columns of a step). In the machine code, a turn of dz w^T
    // issues 5 copies rather than 8 (10 and 16 in its two arms, the last slab's and the others'),
    // and 0.37 other instructions a multiply-add rather than 0.47.
    use kiln_codegen::cuda::{with_tile_choice, TileChoice, TileShape};
    let layer = |m: usize, k: usize, n: usize| {
        let g = Graph::new();
        let x = g.input("x", F32, [m, k]);
        let w = g.input("w", F32, [k, n]);
        let out = x.matmul(&w).relu();
        // Small values, so that 784 products' sums in another order stay within the check's 1e-5.
        let small = |shape: &[usize], seed| kiln::testing::random_tensor(shape, -0.1, 0.1, seed).cast(F32);
        let args = [small(&[m, k], 61), small(&[k, n], 62)];
        emulated_agrees(&g, &[&x, &w], &[&out], &args);
        let f = g.function([&x, &w], [&out]).compile(Device::Reference).unwrap();
        cuda_c(&f, &args)
    };
    let rows_major = "reinterpret_cast<const float4*>(slab_a + kk)[";
    for tile in [TileShape::T64x64, TileShape::T32x32K4] {
        let choice = TileChoice { stages: Some(3), ..TileChoice::forced(tile, 2, false) };
        for (m, k, quads) in [(128, 784, true), (100, 500, true), (128, 250, false)] {
            let src = with_tile_choice(choice, || layer(m, k, 256));
            assert!(src.contains(&format!("in {} tiles", tile.label())), "{src}");
            assert_eq!(src.contains("kiln_cp_async16(tile_a"), quads, "{m}x{k}: {src}");
            assert_eq!(src.contains(rows_major), quads, "{m}x{k}: {src}");
        }
    }
    let quads = input_gradient_source();
    assert!(quads.contains("kiln_cp_async16(tile_a") && quads.contains(rows_major), "{quads}");
    assert!(quads.contains("kiln_cp_async4(tile_b") && !quads.contains("kiln_cp_async16(tile_b"), "{quads}");
    let words = kiln_codegen::cuda::with_quad_copies(false, input_gradient_source);
    assert!(!words.contains("kiln_cp_async16(tile_a") && !words.contains(rows_major), "{words}");
    let (Some(by_quads), Some(by_words)) = (first_slab_loop(&quads), first_slab_loop(&words)) else { return };
    assert!(by_quads.loads.len() < by_words.loads.len(), "{by_quads:?}\n{by_words:?}");
    assert!(by_quads.instructions < by_words.instructions, "{by_quads:?}\n{by_words:?}");
    let (q, w) = (others_a_multiply_add(&quads).unwrap(), others_a_multiply_add(&words).unwrap());
    println!(
        "a turn of dz w^T: {} copies and {q:.2} other instructions a multiply-add by quads, {} and {w:.2} by words",
        by_quads.loads.len(),
        by_words.loads.len()
    );
}

#[test]
fn unsliced_tiles_copy_slabs_twice_as_deep() {
    // The autoencoder's weight gradients x^T dz, unsliced: slabs copied asynchronously are twice
    // the shape's own depth (half the turns, each with its wait, barrier and copies) where the
    // inner dimension (the batch, 128) takes an even number of the shape's slabs: 128x64 tiles
    // 16 deep, 64x64 tiles 32, 32x32 tiles in thread groups 64 (a group's 16 steps). Such a slab
    // is unrolled whole by `#pragma unroll` (NVRTC left 128x64's two steps a turn). Each agrees
    // with the reference on the emulator (columns past the last tile); through registers (one
    // slab buffer), with an odd number of slabs (a batch of 112: 7 of 16), and where switched off,
    // the slabs keep their depth. In the machine code (pip's nvdisasm 13.2) a turn of the
    // 784x128x1000 one in 128x64 tiles spends 1.18 instructions a multiply-add, where 8-deep
    // slabs spent 1.27.
    use kiln_codegen::cuda::{with_tile_choice, TileChoice, TileShape};
    let weight_gradient = |batch: usize, m: usize, n: usize, tile: TileShape, stages: usize| {
        let g = Graph::new();
        let x = g.input("x", F32, [batch, m]);
        let dz = g.input("dz", F32, [batch, n]);
        let w = g.input("w", F32, [m, n]);
        let out = &w - x.t().matmul(&dz) * 0.1;
        let args = [f32s(&[batch, m], 81), f32s(&[batch, n], 82), f32s(&[m, n], 83)];
        let choice = TileChoice { stages: Some(stages), ..TileChoice::forced(tile, 1, false) };
        with_tile_choice(choice, || {
            emulated_agrees(&g, &[&x, &dz, &w], &[&out], &args);
            let f = g.function([&x, &dz, &w], [&out]).compile(Device::Reference).unwrap();
            cuda_c(&f, &args)
        })
    };
    let deep = "#pragma unroll\n";
    for (m, n, tile, steps) in [
        (784, 1000, TileShape::T128x64, "for (int kk = 0; kk < 16; kk += 1)"),
        (1000, 500, TileShape::T64x64, "for (int kk = 0; kk < 32; kk += 1)"),
        (250, 500, TileShape::T32x32K4, "for (int kq = 0; kq < 16; kq += 1)"),
    ] {
        let src = weight_gradient(128, m, n, tile, 3);
        assert!(src.contains(&format!("in {} tiles", tile.label())) && src.contains("(cp.async)"), "{src}");
        assert!(src.contains(deep) && src.contains(steps), "{m}x{n}: {src}");
        if tile == TileShape::T64x64 {
            let odd = weight_gradient(112, m, n, tile, 3);
            assert!(odd.contains("for (int kk = 0; kk < 16; kk += 1)") && !odd.contains(deep), "{odd}");
        }
    }
    let registers = weight_gradient(128, 784, 1000, TileShape::T128x64, 1);
    assert!(registers.contains("for (int kk = 0; kk < 8; kk += 1)") && !registers.contains("#pragma"), "{registers}");
    // KILN_CUDA_DEEP_SLABS=0 (or the compile option) keeps the shape's depth, to time the two.
    let shallow = |tile: TileShape| {
        let opts = kiln_codegen::CompileOptions { deep_slabs: Some(false), ..Default::default() };
        let by_option = kiln_codegen::cuda::with_compile_options(&opts, || weight_gradient(128, 1000, 500, tile, 3));
        assert_eq!(by_option, kiln_codegen::cuda::with_deep_slabs(false, || weight_gradient(128, 1000, 500, tile, 3)));
        by_option
    };
    let kept = shallow(TileShape::T64x64);
    assert!(kept.contains("for (int kk = 0; kk < 16; kk += 1)") && !kept.contains(deep), "{kept}");
    let kept = shallow(TileShape::T128x64);
    assert!(kept.contains("for (int kk = 0; kk < 8; kk += 1)") && !kept.contains(deep), "{kept}");
    let copied = weight_gradient(128, 784, 1000, TileShape::T128x64, 3);
    let Some(slab_loop) = first_slab_loop(&copied) else { return };
    let per_multiply_add = slab_loop.instructions as f64 / slab_loop.multiply_adds as f64;
    assert_eq!(slab_loop.multiply_adds, 512, "{slab_loop:?}");
    assert!(per_multiply_add <= 1.21, "{per_multiply_add:.2} instructions a multiply-add: {slab_loop:?}");
    println!("a turn of x^T dz in 128x64 tiles: {per_multiply_add:.3} instructions a multiply-add");
}

#[test]
fn tensor_core_fragments_load_in_few_accesses_of_few_bytes() {
    // fmnist-mlp-4k's first layer, relu(x w + b) with w [784, 256], on tensor cores in 128x64
    // tiles with three slab buffers (the slabs split a turn ahead). Each lane's fragment of `w`
    // is split into one 16-byte word, its two high parts then its two low parts, so that a warp
    // loads it with one access where the parts in arrays of their own took two; and the 8 warps
    // cover the tile in 4x2 warp tiles of 32x32, which read a fifth fewer fragment bytes than 2x4
    // ones of 64x16 (every lane's bytes its own: shared memory, not the tensor cores, bounds such
    // a turn). It agrees with the reference on the emulator; in the machine code (pip's nvdisasm
    // 13.2) a pass of six turns loads from shared memory 186 times for 288 multiply-adds (the
    // parts apart in 2x4: 234; merged in 2x4: 210), each turn 16 accesses of fragments, 12 words
    // to split and 3 more.
    use kiln_codegen::cuda::{with_tile_choice, TileChoice, TileShape};
    let g = Graph::new();
    let x = g.input("x", F32, [256, 784]);
    let w = g.input("w", F32, [784, 256]);
    let b = g.input("b", F32, [256]);
    let out = (x.matmul(&w) + &b).relu();
    // Small values, so that the emulator's check to 1e-5 holds the sums' rounding (3xTF32's is
    // about twice the FMAs').
    let small = |shape: &[usize], seed| random_tensor(shape, -0.1, 0.1, seed).cast(F32);
    let args = [small(&[256, 784], 91), small(&[784, 256], 92), small(&[256], 93)];
    let choice = TileChoice { stages: Some(3), ..TileChoice::forced(TileShape::T128x64, 1, true) };
    let src = with_tile_choice(choice, || {
        emulated_agrees(&g, &[&x, &w, &b], &[&out], &args);
        let f = g.function([&x, &w, &b], [&out]).compile(Device::Reference).unwrap();
        cuda_c(&f, &args)
    });
    assert!(src.contains("in 128x64 tiles on tensor cores (3xTF32)"), "{src}");
    assert!(src.contains("uint4 split_b[") && !src.contains("split_b_hi"), "{src}");
    assert!(src.contains("const int warp_row = (int)threadIdx.x / 32 / 2;"), "{src}");
    assert!(src.contains(
        "kiln_mma_tf32(acc_0_0, acc_0_1, acc_1_0, acc_1_1, a0_lo.x, a0_lo.y, a0_lo.z, a0_lo.w, b0.x, b0.y);"
    ));
    let Some(slab_loop) = first_slab_loop(&src) else { return };
    let per_multiply_add = slab_loop.shared_loads as f64 / slab_loop.multiply_adds as f64;
    println!("{} shared loads for {} multiply-adds: {slab_loop:?}", slab_loop.shared_loads, slab_loop.multiply_adds);
    assert!(per_multiply_add <= 0.68, "{per_multiply_add:.2} shared loads a multiply-add: {slab_loop:?}");
}
