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

fn check(name: &str, op: UnaryOp, want: fn(f64) -> f64, lo: f64, hi: f64, max_ulps: u64) {
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
    // f32: promote, compute, round once: within 1 ulp of the correctly rounded f32 result.
    let xs32: Vec<f64> = xs.iter().map(|&x| x as f32 as f64).collect();
    let got32 = run(op, &xs32, F32);
    for (&x, &y) in xs32.iter().zip(&got32) {
        let w = want(x) as f32;
        let y = y as f32;
        let ok = y == w || (y.is_nan() && w.is_nan()) || ((y.to_bits() as i64) - (w.to_bits() as i64)).abs() <= 1;
        assert!(ok, "{name} f32 at {x:e}: got {y:e}, want {w:e}");
    }
}

#[test]
fn exp() {
    check("exp", UnaryOp::Exp, f64::exp, -800.0, 800.0, 2);
}
#[test]
fn log() {
    check("log", UnaryOp::Log, f64::ln, -10.0, f64::MAX, 2);
}
#[test]
fn log1p() {
    check("log1p", UnaryOp::Log1p, f64::ln_1p, -1.0, 1e300, 4);
}
#[test]
fn expm1() {
    check("expm1", UnaryOp::Expm1, f64::exp_m1, -800.0, 710.0, 4);
}
#[test]
fn tanh() {
    check("tanh", UnaryOp::Tanh, f64::tanh, -1e3, 1e3, 6);
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
    );
}
#[test]
fn softplus() {
    // reference: the same stable formula in std's functions
    check("softplus", UnaryOp::Softplus, |x| x.max(0.0) + (-x.abs()).exp().ln_1p(), -800.0, 800.0, 5);
}
#[test]
fn sin_cos() {
    check("sin", UnaryOp::Sin, f64::sin, -1e5, 1e5, 2);
    check("cos", UnaryOp::Cos, f64::cos, -1e5, 1e5, 2);
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
