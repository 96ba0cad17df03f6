//! The CPU backend's inline transcendentals against Rust's std over wide input ranges, including
//! extremes, subnormals, infinities and NaN. The bounds asserted here are the ones documented in
//! `codegen/src/cpu/math.rs`.

use kiln::prelude::*;
use kiln::testing::splitmix;

/// Distance in units in the last place between two f64 (0 for equal values or two NaNs).
fn ulps(a: f64, b: f64) -> u64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0;
    }
    if a.is_nan() || b.is_nan() || a.is_infinite() || b.is_infinite() {
        return u64::MAX;
    }
    let key = |x: f64| {
        let i = x.to_bits() as i64;
        if i < 0 {
            i64::MIN - i
        } else {
            i
        }
    };
    (key(a) - key(b)).unsigned_abs()
}

fn inputs(lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut r = splitmix(seed);
    let mut v: Vec<f64> = (0..4000).map(|_| lo + (hi - lo) * r()).collect();
    // log-spaced magnitudes of both signs, clamped to the range
    for e in -320..=308 {
        for m in [1.0, 2.5, 7.0] {
            let x = m * 10f64.powi(e);
            v.extend([x, -x].into_iter().filter(|x| (lo..=hi).contains(x)));
        }
    }
    v.extend([0.0, -0.0, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, f64::MIN_POSITIVE, 5e-324, 1.0, -1.0]);
    v
}

fn run(op: UnaryOp, xs: &[f64], dtype: DType) -> Vec<f64> {
    let g = Graph::new();
    let x = g.input("x", dtype, [xs.len()]);
    let mut f = g.function([&x], [&x.unary(op)]).compile(Device::Cpu).unwrap();
    f.call1(&[Tensor::from_f64(dtype, &[xs.len()], xs)]).unwrap().to_f64_vec()
}

/// Distance in units in the last place between two f32 (0 for equal values or two NaNs).
fn ulps32(a: f32, b: f32) -> u64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0;
    }
    if a.is_nan() || b.is_nan() {
        return u64::MAX;
    }
    // bits as a signed integer, negative floats mirrored, so that adjacent floats differ by 1
    let key = |x: f32| {
        let i = x.to_bits() as i32 as i64;
        if i < 0 {
            i32::MIN as i64 - i
        } else {
            i
        }
    };
    (key(a) - key(b)).unsigned_abs()
}

/// The largest error of f32 `op` over `xs`, in ulps of the correctly rounded result, and where.
fn worst_f32(op: UnaryOp, want: fn(f64) -> f64, xs: &[f64]) -> (u64, f64, f32, f32) {
    let got = run(op, xs, F32);
    let mut worst = (0, 0.0, 0.0, 0.0);
    for (&x, &y) in xs.iter().zip(&got) {
        let (y, w) = (y as f32, want(x) as f32);
        let u = ulps32(y, w);
        if u > worst.0 {
            worst = (u, x, y, w);
        }
    }
    worst
}

/// Checks f64 `op` within `max_ulps` and f32 `op` within `max_ulps32` (the tables of
/// `codegen/src/cpu/math.rs` and `math/single.rs`).
fn check(name: &str, op: UnaryOp, want: fn(f64) -> f64, lo: f64, hi: f64, max_ulps: u64, max_ulps32: u64) {
    let xs = inputs(lo, hi, 7);
    let got = run(op, &xs, F64);
    let mut worst = (0u64, 0.0);
    for (&x, &y) in xs.iter().zip(&got) {
        let w = want(x);
        let u = ulps(y, w);
        if u > worst.0 {
            worst = (u, x);
        }
    }
    assert!(
        worst.0 <= max_ulps,
        "{name}: {} ulps at x = {:e} (got {:e}, want {:e})",
        worst.0,
        worst.1,
        run(op, &[worst.1], F64)[0],
        want(worst.1)
    );
    let xs32: Vec<f64> = xs.iter().map(|&x| x as f32 as f64).collect();
    let (u, x, y, w) = worst_f32(op, want, &xs32);
    assert!(u <= max_ulps32, "{name} f32: {u} ulps at {x:e}: got {y:e}, want {w:e}");
}

#[test]
fn exp() {
    check("exp", UnaryOp::Exp, f64::exp, -800.0, 800.0, 2, 1);
}
#[test]
fn log() {
    check("log", UnaryOp::Log, f64::ln, -10.0, f64::MAX, 2, 1);
}
#[test]
fn log1p() {
    check("log1p", UnaryOp::Log1p, f64::ln_1p, -1.0, 1e300, 4, 2);
}
#[test]
fn expm1() {
    check("expm1", UnaryOp::Expm1, f64::exp_m1, -800.0, 710.0, 4, 2);
}
#[test]
fn tanh() {
    check("tanh", UnaryOp::Tanh, f64::tanh, -1e3, 1e3, 6, 3);
}
#[test]
fn sigmoid() {
    check(
        "sigmoid",
        UnaryOp::Sigmoid,
        |x| if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) },
        -800.0,
        800.0,
        3,
        2,
    );
}
#[test]
fn softplus() {
    // reference: the same stable formula in std's functions
    check("softplus", UnaryOp::Softplus, |x| x.max(0.0) + (-x.abs()).exp().ln_1p(), -800.0, 800.0, 5, 3);
}
#[test]
fn sin_cos() {
    check("sin", UnaryOp::Sin, f64::sin, -1e5, 1e5, 2, 1);
    check("cos", UnaryOp::Cos, f64::cos, -1e5, 1e5, 2, 1);
}

#[test]
fn pow_against_std() {
    let g = Graph::new();
    let a = g.input("a", F64, [Dim::sym("n")]);
    let b = g.input("b", F64, [Dim::sym("n")]);
    let mut f = g.function([&a, &b], [&a.pow(&b)]).compile(Device::Cpu).unwrap();
    let mut r = splitmix(3);
    let mut xs: Vec<(f64, f64)> = (0..4000).map(|_| (r() * 100.0, r() * 20.0 - 10.0)).collect();
    xs.extend([
        (-2.0, 3.0),
        (-2.0, 2.0),
        (-2.0, 0.5),
        (0.0, 2.0),
        (0.0, -1.0),
        (f64::NAN, 0.0),
        (1.0, f64::NAN),
        (f64::INFINITY, -1.0),
        (-0.5, 1e300),
    ]);
    let (av, bv): (Vec<f64>, Vec<f64>) = xs.iter().copied().unzip();
    let n = av.len();
    let got = f.call1(&[Tensor::from_f64(F64, &[n], &av), Tensor::from_f64(F64, &[n], &bv)]).unwrap().to_f64_vec();
    for ((a, b), y) in xs.iter().zip(got) {
        let w = a.powf(*b);
        let bound = ((4.0 * b * a.abs().ln()).abs().ceil() as u64).saturating_add(2);
        assert!(ulps(y, w) <= bound, "pow({a}, {b}) = {y:e}, want {w:e}");
    }
}

/// f32 kernels have their own approximations (f32 lanes for exp, log and what is built on them,
/// shorter f64 series for the rest; see `codegen/src/cpu/math.rs`), so they get a dense check:
/// random bit patterns over every finite f32, plus uniform samples of the range where the function
/// is not constant, each within the documented ulps of the correctly rounded result.
#[test]
fn f32_results_within_documented_ulps_on_dense_samples() {
    type Want = fn(f64) -> f64;
    let sigmoid: Want = |x| if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) };
    let softplus: Want = |x| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let cases: [(&str, UnaryOp, Want, f64, f64, u64); 11] = [
        ("exp", UnaryOp::Exp, f64::exp, -110.0, 95.0, 1),
        ("log", UnaryOp::Log, f64::ln, 0.0, 4.0, 1),
        ("log1p", UnaryOp::Log1p, f64::ln_1p, -1.0, 4.0, 2),
        ("log1p near 0", UnaryOp::Log1p, f64::ln_1p, -1e-3, 1e-3, 2),
        ("expm1", UnaryOp::Expm1, f64::exp_m1, -20.0, 95.0, 2),
        ("tanh", UnaryOp::Tanh, f64::tanh, -12.0, 12.0, 3),
        ("sigmoid", UnaryOp::Sigmoid, sigmoid, -110.0, 110.0, 2),
        ("softplus", UnaryOp::Softplus, softplus, -110.0, 110.0, 3),
        ("sin", UnaryOp::Sin, f64::sin, -1e5, 1e5, 1),
        ("cos", UnaryOp::Cos, f64::cos, -1e5, 1e5, 1),
        ("sin near 0", UnaryOp::Sin, f64::sin, -4.0, 4.0, 1),
    ];
    let mut report = String::new();
    for (i, (name, op, want, lo, hi, bound)) in cases.into_iter().enumerate() {
        let mut r = splitmix(11 + i as u64);
        let mut xs: Vec<f64> = (0..100_000).map(|_| (lo + (hi - lo) * r()) as f32 as f64).collect();
        let sin_like = matches!(op, UnaryOp::Sin | UnaryOp::Cos);
        while xs.len() < 200_000 {
            let x = f32::from_bits((r() * u32::MAX as f64) as u32);
            // sin and cos are documented for abs(x) <= 1e5 only
            if x.is_finite() && !(sin_like && x.abs() > 1e5) {
                xs.push(x as f64);
            }
        }
        let (u, x, y, w) = worst_f32(op, want, &xs);
        report.push_str(&format!("{name}: {u} ulps at {x:e} (got {y:e}, want {w:e}), bound {bound}\n"));
        assert!(u <= bound, "{report}");
    }
    eprint!("{report}");
}

#[test]
fn f32_pow_within_one_ulp() {
    let g = Graph::new();
    let a = g.input("a", F32, [Dim::sym("n")]);
    let b = g.input("b", F32, [Dim::sym("n")]);
    let mut f = g.function([&a, &b], [&a.pow(&b)]).compile(Device::Cpu).unwrap();
    let mut r = splitmix(5);
    let xs: Vec<(f64, f64)> =
        (0..100_000).map(|_| ((r() * 100.0) as f32 as f64, (r() * 30.0 - 15.0) as f32 as f64)).collect();
    let (av, bv): (Vec<f64>, Vec<f64>) = xs.iter().copied().unzip();
    let n = av.len();
    let got = f.call1(&[Tensor::from_f64(F32, &[n], &av), Tensor::from_f64(F32, &[n], &bv)]).unwrap().to_f64_vec();
    for ((a, b), y) in xs.iter().zip(got) {
        let (y, w) = (y as f32, a.powf(*b) as f32);
        let ok = y == w || ((y.to_bits() as i64) - (w.to_bits() as i64)).abs() <= 1;
        assert!(ok, "pow({a}, {b}) f32 = {y:e}, want {w:e}");
    }
}
