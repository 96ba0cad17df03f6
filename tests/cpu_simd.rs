//! The CPU backend's SIMD loops (f32x4, f64x2) against the reference backend, bit for bit: lengths
//! that leave a scalar tail, broadcast operands (splatted), NaN, infinities and signed zeros, and
//! every op that has a vector form.

use kiln::prelude::*;

fn values(n: usize, dtype: DType) -> Tensor {
    let special = [f64::NAN, 0.0, -0.0, f64::INFINITY, f64::NEG_INFINITY, 1.5, -2.25, 3.0];
    let v: Vec<f64> = (0..n)
        .map(|i| if i % 5 == 0 { special[(i / 5) % special.len()] } else { (i as f64 * 0.37).sin() * 4.0 })
        .collect();
    Tensor::from_f64(dtype, &[n / 7, 7], &v)
}

#[test]
fn simd_matches_reference_exactly() {
    for dtype in [F32, F64] {
        let g = Graph::new();
        let x = g.input("x", dtype, [Dim::sym("n"), 7.into()]);
        let y = g.input("y", dtype, [Dim::sym("n"), 7.into()]);
        let row = g.input("row", dtype, [7]);
        let col = g.input("col", dtype, [Dim::sym("n"), 1.into()]);
        let outs = [
            (&x * &y + &row) / (col.abs() + 1.0),
            x.maximum(&y).minimum(&row) - (-&x).relu(),
            x.gt(&y).and(x.lt(3.0)).or(y.eq(0.0).not()).select(x.sqrt(), y.floor() * col.ceil()),
            x.abs().rsqrt() + y.reciprocal(),
            (x.ge(&row).select(&x, 0.0) + y.le(&col).select(1.0, &y)).relu(),
        ];
        let refs: Vec<&Var> = outs.iter().collect();
        let args = [
            values(63, dtype),
            values(63, dtype).cast(dtype),
            values(7, dtype).into_shape(&[7]).unwrap(),
            values(63, dtype).into_shape(&[63]).unwrap().into_shape(&[9, 7]).unwrap(),
        ];
        let col_arg = Tensor::from_f64(dtype, &[9, 1], &args[3].to_f64_vec()[..9]);
        let y_arg = Tensor::from_f64(dtype, &[9, 7], &args[0].to_f64_vec().iter().rev().copied().collect::<Vec<_>>());
        let args = [args[0].clone(), y_arg, args[2].clone(), col_arg];
        let mut cpu = g.function([&x, &y, &row, &col], refs.clone()).compile(Device::Cpu).unwrap();
        let mut reference = g.function([&x, &y, &row, &col], refs).compile(Device::Reference).unwrap();
        let (a, b) = (cpu.call(&args).unwrap(), reference.call(&args).unwrap());
        for (k, (p, q)) in a.iter().zip(&b).enumerate() {
            for (i, (u, v)) in p.to_f64_vec().iter().zip(q.to_f64_vec()).enumerate() {
                let same = u.to_bits() == v.to_bits() || (u.is_nan() && v.is_nan());
                assert!(same, "{dtype} output {k} element {i}: cpu {u:e} vs reference {v:e}");
            }
        }
        // the kernels did take the vector path
        let code = cpu.generated_code();
        let vt = if dtype == F32 { "f32x4" } else { "f64x2" };
        assert!(code.contains(&format!("load.{vt}")), "no {vt} loads in:\n{code}");
    }
}

#[test]
fn simd_reads_and_writes_unaligned_memory() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n")]);
    let y = (&x * 2.0 + 1.0).relu();
    let mut f = g.function([&x], [&y]).compile(Device::Cpu).unwrap();
    let big = Array1::from_shape_fn(41, |i| i as f32 - 20.0);
    // a contiguous view one element in: 4-byte aligned, not 16
    let view = big.slice(ndarray::s![1..]).to_owned();
    // an owned array whose data starts one element into its allocation
    let moved = big.clone().slice_move(ndarray::s![1..]);
    assert_eq!(moved.as_ptr() as usize % 16, (big.as_ptr() as usize + 4) % 16);
    assert!(moved.is_standard_layout());
    let shifted: Tensor = moved.into();
    let out = f.call1(&[shifted]).unwrap().to_f64_vec();
    let want: Vec<f64> = view.iter().map(|&v| ((v * 2.0 + 1.0) as f64).max(0.0)).collect();
    assert_eq!(out, want);
    // and a variable updated in place from an odd offset (the split ranges start anywhere)
    let w = g.shared("w", Array1::from_shape_fn(37, |i| i as f32));
    let mut step = g.function([], []).updates([(&w, &w * 0.5 + 1.0)]).compile(Device::Cpu).unwrap();
    step.call(&[]).unwrap();
    assert_eq!(w.value().unwrap().to_f64_vec(), (0..37).map(|i| i as f64 * 0.5 + 1.0).collect::<Vec<_>>());
}
