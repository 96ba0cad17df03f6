//! Property test: float products of random sizes (large enough for kiln's tiled kernel), operand
//! layouts and epilogues, run as the CUDA backend's program (on the CUDA emulator and, where there
//! is one, the GPU) against the reference backend. The sizes give partial edge tiles, inner dims
//! that are no multiple of a slab, and inner dims whole or cut into slices; half the cases force a
//! tile shape (32x32, 64x64, or the 128x64 and 128x128 tiles kiln only uses when asked), a
//! number of slices, float32 FMAs or tensor cores (3xTF32, at the same tolerance), slab buffers,
//! and the slices of a tile as a thread block cluster or finished by a ticket, and
//! half run on the emulator's mirrored schedule (blocks and threads in the other order).
#![allow(clippy::cloned_ref_to_slice_refs)]

use kiln::prelude::*;
use kiln::testing::random_tensor;
use kiln_codegen::cuda::emulator::with_mirrored_schedule;
use kiln_codegen::cuda::{with_tile_choice, TileChoice, TileShape};
use proptest::prelude::*;

/// Multiply-adds above which a float product no longer gets a thread per output.
const SMALL_PRODUCT: usize = 1 << 19;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn tiled_products_equal_the_reference(
        m in 2usize..300,
        n in 2usize..300,
        k in 1usize..800,
        a_transposed in any::<bool>(),
        b_transposed in any::<bool>(),
        epilogue in 0usize..3,
        forced in prop::option::of((prop::sample::select(TileShape::ALL.to_vec()), 1usize..13, any::<bool>(), 1usize..5, any::<bool>())),
        mirrored in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let choice = forced.map_or(TileChoice::default(), |(tile, slices, tensor_cores, stages, cluster)| TileChoice { tiled: None, tile: Some(tile), slices: Some(slices), tensor_cores: Some(tensor_cores), stages: Some(stages), cluster: Some(cluster) });
        // At least the smallest tiled size: few outputs then take a long inner dim (many slices).
        let k = k.max(SMALL_PRODUCT / (m * n) + 1);
        let g = Graph::new();
        let a_shape = if a_transposed { [k, m] } else { [m, k] };
        let b_shape = if b_transposed { [n, k] } else { [k, n] };
        let (a_in, b_in) = (g.input("a", F32, a_shape), g.input("b", F32, b_shape));
        let a = if a_transposed { a_in.t() } else { a_in.clone() };
        let b = if b_transposed { b_in.t() } else { b_in.clone() };
        let bias = g.input("bias", F32, [n]);
        let v = g.shared("v", random_tensor(&[m, n], -1.0, 1.0, seed + 3).cast(F32));
        let product = a.matmul(&b);
        // bias and activation, a parameter update in place, or an activation alone
        let (out, updates) = match epilogue {
            0 => ((&product + &bias).relu(), vec![]),
            1 => (bias.sum_all(), vec![(v.clone(), &v - 0.1 * &product)]),
            _ => ((&product * 0.5).tanh(), vec![]),
        };
        let args = [
            random_tensor(&a_shape, -1.0, 1.0, seed).cast(F32),
            random_tensor(&b_shape, -1.0, 1.0, seed + 1).cast(F32),
            random_tensor(&[n], -1.0, 1.0, seed + 2).cast(F32),
        ];
        let v0 = v.value().unwrap();
        let build = |device| g.function([&a_in, &b_in, &bias], [&out]).updates(updates.iter().map(|(p, u)| (p, u.clone()))).compile(device).unwrap();
        let want = build(Device::Reference).call(&args).unwrap();
        let v_want = v.value().unwrap();
        for device in kiln::testing::cuda_test_devices() {
            v.set_value(v0.clone()).unwrap();
            // (the program is specialized, so tiled, at its first call)
            let run = || with_tile_choice(choice, || {
                let mut f = build(device);
                let got = f.call(&args).unwrap();
                (f, got)
            });
            let (f, got) = if mirrored { with_mirrored_schedule(run) } else { run() };
            let v_got = v.value().unwrap();
            // Sums of k products of values in [-1, 1], in another order than the reference's.
            let tol = 1e-6 * k as f64;
            let pairs = [(got[0].to_f64_vec(), want[0].to_f64_vec()), (v_got.to_f64_vec(), v_want.to_f64_vec())];
            for (u, w) in pairs.iter().flat_map(|(g, w)| g.iter().zip(w)) {
                prop_assert!((u - w).abs() <= tol + 1e-5 * w.abs(), "{:?} {}x{}x{}: {} vs {}", device, m, k, n, u, w);
            }
            let code = f.generated_code();
            prop_assert!(code.contains(&format!("({m}x{k}x{n}) in ")), "{:?}: not tiled\n{}", device, code);
        }
    }
}
