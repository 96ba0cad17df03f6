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

#[test]
fn simd_transcendentals_equal_the_scalar_path_bit_for_bit() {
    for dtype in [F32, F64] {
        let g = Graph::new();
        let x1 = g.input("x1", dtype, [Dim::sym("n")]);
        let x2 = g.input("x2", dtype, [Dim::sym("n")]);
        let keep = g.input("keep", Bool, [Dim::sym("n")]);
        let p = g.input("p", dtype, [Dim::sym("n")]);
        let ops: Vec<fn(&Var) -> Var> = vec![
            |v| v.exp(),
            |v| v.log(),
            |v| v.log1p(),
            |v| v.expm1(),
            |v| v.tanh(),
            |v| v.sigmoid(),
            |v| v.softplus(),
            |v| v.sin(),
            |v| v.cos(),
        ];
        let mut outs = vec![];
        for op in &ops {
            outs.push(op(&x1)); // vector lanes (and a scalar tail)
            outs.push(keep.select(op(&x2), 0.0)); // a bool operand keeps this kernel scalar
        }
        outs.push(x1.abs().pow(&p));
        outs.push(keep.select(x2.abs().pow(&p), 0.0));
        let refs: Vec<&Var> = outs.iter().collect();
        let mut f = g.function([&x1, &x2, &keep, &p], refs).compile(Device::Cpu).unwrap();
        let n = 1001;
        let v: Vec<f64> = (0..n)
            .map(|i| match i % 7 {
                0 => [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, 800.0, -800.0][(i / 7) % 7],
                _ => ((i as f64) * 0.731).sin() * 10f64.powi((i % 9) as i32 - 4),
            })
            .collect();
        let x = Tensor::from_f64(dtype, &[n], &v);
        let pv: Vec<f64> = (0..n).map(|i| (i % 11) as f64 * 0.5 - 2.0).collect();
        let args = [x.clone(), x, Tensor::from_f64(Bool, &[n], &vec![1.0; n]), Tensor::from_f64(dtype, &[n], &pv)];
        let out = f.call(&args).unwrap();
        for k in 0..out.len() / 2 {
            let (a, b) = (out[2 * k].to_f64_vec(), out[2 * k + 1].to_f64_vec());
            for i in 0..n {
                let same = a[i].to_bits() == b[i].to_bits() || (a[i].is_nan() && b[i].is_nan());
                assert!(same, "{dtype} op {k} at x = {:e}: vector {:e} vs scalar {:e}", v[i], a[i], b[i]);
            }
        }
        let vt = if dtype == F32 { "fvpromote_low" } else { "f64x2" };
        assert!(f.generated_code().contains(vt), "the transcendental kernels did not vectorize");
    }
}

/// Sums and means over outer dims (column sums, bias gradients) run their innermost kept dim in
/// vectors: bit for bit the reference's sequential f64 accumulation, with tails, broadcast and fused
/// operands, NaN and infinities.
#[test]
fn outer_reductions_match_reference_exactly() {
    for dtype in [F32, F64] {
        let g = Graph::new();
        let x = g.input("x", dtype, [Dim::sym("n"), 7.into()]);
        let row = g.input("row", dtype, [7]);
        let cube = g.input("cube", dtype, [3, 3, 7]);
        let outs = [
            x.sum(&[0]),
            (&x * &row + 1.0).mean(&[0]),
            x.abs().sqrt().sum_keepdims(&[0]),
            cube.sum(&[0, 1]),
            (&cube * &x.reshape(&[3, 3, 7])).mean(&[1]),
        ];
        let refs: Vec<&Var> = outs.iter().collect();
        let args = [
            values(63, dtype),
            values(7, dtype).into_shape(&[7]).unwrap(),
            values(63, dtype).into_shape(&[3, 3, 7]).unwrap(),
        ];
        let mut cpu = g.function([&x, &row, &cube], refs.clone()).compile(Device::Cpu).unwrap();
        let mut reference = g.function([&x, &row, &cube], refs).compile(Device::Reference).unwrap();
        let (a, b) = (cpu.call(&args).unwrap(), reference.call(&args).unwrap());
        for (k, (p, q)) in a.iter().zip(&b).enumerate() {
            assert_eq!(p.shape(), q.shape());
            for (i, (u, v)) in p.to_f64_vec().iter().zip(q.to_f64_vec()).enumerate() {
                let same = u.to_bits() == v.to_bits() || (u.is_nan() && v.is_nan());
                assert!(same, "{dtype} output {k} element {i}: cpu {u:e} vs reference {v:e}");
            }
        }
        // every reduction kernel took the vector path: zeroed f64x2 accumulators
        let code = cpu.generated_code();
        let kernels: Vec<&str> =
            code.split("\nfunction ").skip(1).filter(|k| k.contains("_sum") || k.contains("_mean")).collect();
        assert_eq!(kernels.len(), 5, "{code}");
        for kernel in kernels {
            assert!(kernel.contains("splat.f64x2"), "a scalar reduction:\n{kernel}");
        }
    }
}

/// Sums, means, maxima and minima along the innermost dim (row reductions: softmax's row max and
/// sum of exponentials, a loss's mean) run it in vectors: max and min bit for bit the reference's,
/// sums (added in another order) within an f64 rounding of it before the final rounding.
#[test]
fn inner_reductions_match_reference() {
    for dtype in [F32, F64] {
        let g = Graph::new();
        let x = g.input("x", dtype, [Dim::sym("n"), 7.into()]);
        let wide = g.input("wide", dtype, [3, 37]);
        let outs = [
            x.sum(&[1]),
            x.max(&[1]),
            x.min_keepdims(&[1]),
            (&x * 2.0).exp().mean(&[1]),
            wide.sum(&[1]),
            wide.abs().sqrt().mean_all(),
            wide.max(&[0, 1]),
        ];
        let refs: Vec<&Var> = outs.iter().collect();
        let finite: Vec<f64> = (0..111).map(|i| (i as f64 * 0.61).sin() * 3.0).collect();
        let args = [values(63, dtype), Tensor::from_f64(dtype, &[3, 37], &finite)];
        let mut cpu = g.function([&x, &wide], refs.clone()).compile(Device::Cpu).unwrap();
        let mut reference = g.function([&x, &wide], refs).compile(Device::Reference).unwrap();
        let (a, b) = (cpu.call(&args).unwrap(), reference.call(&args).unwrap());
        for (k, (p, q)) in a.iter().zip(&b).enumerate() {
            assert_eq!(p.shape(), q.shape());
            let exact = k == 1 || k == 2 || k == 6;
            for (i, (u, v)) in p.to_f64_vec().iter().zip(q.to_f64_vec()).enumerate() {
                let same = u.to_bits() == v.to_bits() || (u.is_nan() && v.is_nan()) || *u == v;
                let close = (u - v).abs() <= 1e-15 * v.abs() + if dtype == F32 { v.abs() * 1.2e-7 } else { 0.0 };
                assert!(same || (!exact && close), "{dtype} output {k} element {i}: cpu {u:e} vs reference {v:e}");
            }
        }
        let code = cpu.generated_code();
        let vt = if dtype == F32 { "f32x4" } else { "f64x2" };
        for kernel in code.split("\nfunction ").skip(1) {
            assert!(kernel.contains(&format!("load.{vt}")), "a scalar reduction:\n{kernel}");
        }
    }
}
