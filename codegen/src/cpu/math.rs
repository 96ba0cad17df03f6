//! Transcendental functions emitted inline as Cranelift IR (no call per element). Each is computed
//! in f64 (f32 kernels promote, compute and round once, so f32 results are within 1 ulp of the
//! correctly rounded value). Maximum errors in f64, measured against Rust's std over wide ranges by
//! `tests/cpu_math.rs` (which asserts these bounds):
//!
//! | function | method | max error (f64) |
//! |---|---|---|
//! | exp | k = round(x/ln2), r = x - k ln2 (two-part ln2), Taylor degree 13, scale 2^k in two steps | 2 ulp |
//! | log | x = m 2^e, m in [sqrt(1/2), sqrt(2)), 2 atanh((m-1)/(m+1)) series to s^21 | 2 ulp |
//! | log1p | u = 1 + x; x if u == 1, else log(u) x / (u - 1) (Goldberg) | 4 ulp |
//! | expm1 | u = exp(x); x if u == 1, else (u - 1) x / log(u) (Kahan) | 4 ulp |
//! | tanh | copysign(e / (e + 2), x), e = expm1(2 min(abs(x), 20)) | 6 ulp |
//! | sigmoid | e = exp(-abs(x)); 1/(1+e) or e/(1+e) | 3 ulp |
//! | softplus | max(x, 0) + log1p(exp(-abs(x))) | 4 ulp + 1 ulp of max(x,0) |
//! | sin, cos | k = round(2x/pi), three-part Cody-Waite pi/2 (exact for abs(x) < 2^20 pi/2), Taylor to degree 17/18 | 2 ulp for abs(x) <= 1e5 |
//! | pow | exp(b log abs(a)) with IEEE special cases (negative base with integral exponent); the 2-ulp error of log is amplified by b | (2 + 4 abs(b ln a)) ulp |
//!
//! NaN propagates through every function; infinities give the IEEE results.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

/// ln 2 split so that k * LN2_HI is exact for |k| < 2^20 (fdlibm's constants).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// pi/2 in three parts of 33 bits each (fdlibm's pio2_1, pio2_2, pio2_3).
const PIO2_PARTS: [f64; 3] = [
    f64::from_bits(0x3ff9_21fb_5440_0000),
    f64::from_bits(0x3dd0_b461_1a60_0000),
    f64::from_bits(0x3ba3_198a_2e00_0000),
];

fn c(b: &mut FunctionBuilder, v: f64) -> Value {
    b.ins().f64const(v)
}

/// Horner evaluation of sum(coeffs[i] * x^i).
fn horner(b: &mut FunctionBuilder, x: Value, coeffs: &[f64]) -> Value {
    let mut acc = c(b, *coeffs.last().expect("non-empty"));
    for &k in coeffs.iter().rev().skip(1) {
        let t = b.ins().fmul(acc, x);
        let kk = c(b, k);
        acc = b.ins().fadd(t, kk);
    }
    acc
}

fn inv_factorials(n: usize) -> Vec<f64> {
    let mut v = vec![1.0];
    for i in 1..=n {
        v.push(v[i - 1] / i as f64);
    }
    v
}

/// 2^k for an i64 k in [-1022, 1023] (as the bits of a normal f64).
fn pow2(b: &mut FunctionBuilder, k: Value) -> Value {
    let biased = b.ins().iadd_imm_s(k, 1023);
    let bits = b.ins().ishl_imm_s(biased, 52);
    b.ins().bitcast(types::F64, MemFlagsData::new(), bits)
}

pub fn exp(b: &mut FunctionBuilder, x: Value) -> Value {
    let (hi, lo) = (c(b, 710.0), c(b, -746.0));
    let x = b.ins().fmin(x, hi);
    let x = b.ins().fmax(x, lo);
    let log2e = c(b, std::f64::consts::LOG2_E);
    let t = b.ins().fmul(x, log2e);
    let k = b.ins().nearest(t);
    let (ln2_hi, ln2_lo) = (c(b, LN2_HI), c(b, LN2_LO));
    let kh = b.ins().fmul(k, ln2_hi);
    let r = b.ins().fsub(x, kh);
    let kl = b.ins().fmul(k, ln2_lo);
    let r = b.ins().fsub(r, kl);
    let p = horner(b, r, &inv_factorials(13));
    let ki = b.ins().fcvt_to_sint_sat(types::I64, k);
    let k1 = b.ins().sshr_imm_s(ki, 1);
    let k2 = b.ins().isub(ki, k1);
    let s1 = pow2(b, k1);
    let s2 = pow2(b, k2);
    let p = b.ins().fmul(p, s1);
    b.ins().fmul(p, s2)
}

pub fn log(b: &mut FunctionBuilder, x: Value) -> Value {
    // Subnormals: scale into the normal range first.
    let min_normal = c(b, f64::MIN_POSITIVE);
    let is_sub = b.ins().fcmp(FloatCC::LessThan, x, min_normal);
    let two54 = c(b, 18_014_398_509_481_984.0);
    let scaled = b.ins().fmul(x, two54);
    let xs = b.ins().select(is_sub, scaled, x);
    let zero_i = b.ins().iconst(types::I64, 0);
    let m54 = b.ins().iconst(types::I64, -54);
    let e_adj = b.ins().select(is_sub, m54, zero_i);
    let bits = b.ins().bitcast(types::I64, MemFlagsData::new(), xs);
    let eb = b.ins().ushr_imm_s(bits, 52);
    let eb = b.ins().band_imm_s(eb, 0x7ff);
    let e = b.ins().iadd_imm_s(eb, -1023);
    let e = b.ins().iadd(e, e_adj);
    let mant = b.ins().band_imm_s(bits, 0x000f_ffff_ffff_ffff);
    let mant = b.ins().bor_imm_s(mant, 0x3ff0_0000_0000_0000);
    let m = b.ins().bitcast(types::F64, MemFlagsData::new(), mant);
    let sqrt2 = c(b, std::f64::consts::SQRT_2);
    let big = b.ins().fcmp(FloatCC::GreaterThan, m, sqrt2);
    let half = c(b, 0.5);
    let mh = b.ins().fmul(m, half);
    let m = b.ins().select(big, mh, m);
    let e1 = b.ins().iadd_imm_s(e, 1);
    let e = b.ins().select(big, e1, e);
    let one = c(b, 1.0);
    let num = b.ins().fsub(m, one);
    let den = b.ins().fadd(m, one);
    let s = b.ins().fdiv(num, den);
    let z = b.ins().fmul(s, s);
    let coeffs: Vec<f64> = (0..11).map(|i| 1.0 / (2 * i + 1) as f64).collect();
    let p = horner(b, z, &coeffs);
    let two_s = b.ins().fadd(s, s);
    let logm = b.ins().fmul(two_s, p);
    let ef = b.ins().fcvt_from_sint(types::F64, e);
    let (ln2_hi, ln2_lo) = (c(b, LN2_HI), c(b, LN2_LO));
    let lo = b.ins().fmul(ef, ln2_lo);
    let lo = b.ins().fadd(lo, logm);
    let hi = b.ins().fmul(ef, ln2_hi);
    let r = b.ins().fadd(hi, lo);
    // Special values: log(inf) = inf, log(0) = -inf, log(x < 0) = log(NaN) = NaN.
    let inf = c(b, f64::INFINITY);
    let is_inf = b.ins().fcmp(FloatCC::Equal, x, inf);
    let r = b.ins().select(is_inf, inf, r);
    let zero = c(b, 0.0);
    let is_zero = b.ins().fcmp(FloatCC::Equal, x, zero);
    let ninf = c(b, f64::NEG_INFINITY);
    let r = b.ins().select(is_zero, ninf, r);
    let bad = b.ins().fcmp(FloatCC::UnorderedOrLessThan, x, zero);
    let nan = c(b, f64::NAN);
    b.ins().select(bad, nan, r)
}

pub fn log1p(b: &mut FunctionBuilder, x: Value) -> Value {
    let one = c(b, 1.0);
    let u = b.ins().fadd(one, x);
    let d = b.ins().fsub(u, one);
    let lu = log(b, u);
    let q = b.ins().fdiv(x, d);
    let r = b.ins().fmul(lu, q);
    let zero = c(b, 0.0);
    let tiny = b.ins().fcmp(FloatCC::Equal, d, zero);
    let r = b.ins().select(tiny, x, r);
    let inf = c(b, f64::INFINITY);
    let is_inf = b.ins().fcmp(FloatCC::Equal, x, inf);
    b.ins().select(is_inf, inf, r)
}

pub fn expm1(b: &mut FunctionBuilder, x: Value) -> Value {
    let u = exp(b, x);
    let one = c(b, 1.0);
    let um1 = b.ins().fsub(u, one);
    let lu = log(b, u);
    // (u - 1) * (x / log u): dividing first keeps the product finite up to exp's overflow.
    let q = b.ins().fdiv(x, lu);
    let r = b.ins().fmul(um1, q);
    let is_one = b.ins().fcmp(FloatCC::Equal, u, one);
    let r = b.ins().select(is_one, x, r);
    let m1 = c(b, -1.0);
    let is_m1 = b.ins().fcmp(FloatCC::Equal, um1, m1);
    let r = b.ins().select(is_m1, m1, r);
    let inf = c(b, f64::INFINITY);
    let is_inf = b.ins().fcmp(FloatCC::Equal, u, inf);
    b.ins().select(is_inf, inf, r)
}

pub fn tanh(b: &mut FunctionBuilder, x: Value) -> Value {
    let a = b.ins().fabs(x);
    let twenty = c(b, 20.0);
    let a = b.ins().fmin(a, twenty);
    let a2 = b.ins().fadd(a, a);
    let e = expm1(b, a2);
    let two = c(b, 2.0);
    let d = b.ins().fadd(e, two);
    let t = b.ins().fdiv(e, d);
    b.ins().fcopysign(t, x)
}

pub fn sigmoid(b: &mut FunctionBuilder, x: Value) -> Value {
    let a = b.ins().fabs(x);
    let na = b.ins().fneg(a);
    let e = exp(b, na);
    let one = c(b, 1.0);
    let d = b.ins().fadd(one, e);
    let pos = b.ins().fdiv(one, d);
    let neg = b.ins().fdiv(e, d);
    let zero = c(b, 0.0);
    let ge = b.ins().fcmp(FloatCC::GreaterThanOrEqual, x, zero);
    b.ins().select(ge, pos, neg)
}

pub fn softplus(b: &mut FunctionBuilder, x: Value) -> Value {
    let a = b.ins().fabs(x);
    let na = b.ins().fneg(a);
    let e = exp(b, na);
    let l = log1p(b, e);
    let zero = c(b, 0.0);
    let m = b.ins().fmax(x, zero);
    b.ins().fadd(m, l)
}

/// (sin r, cos r) for r in [-pi/4, pi/4].
fn sincos_poly(b: &mut FunctionBuilder, r: Value) -> (Value, Value) {
    let f = inv_factorials(18);
    let z = b.ins().fmul(r, r);
    let sin_c: Vec<f64> = (0..9).map(|i| if i % 2 == 0 { f[2 * i + 1] } else { -f[2 * i + 1] }).collect();
    let cos_c: Vec<f64> = (0..10).map(|i| if i % 2 == 0 { f[2 * i] } else { -f[2 * i] }).collect();
    let ps = horner(b, z, &sin_c);
    let s = b.ins().fmul(r, ps);
    let cs = horner(b, z, &cos_c);
    (s, cs)
}

/// sin or cos with Cody-Waite reduction by pi/2.
pub fn sin_cos(b: &mut FunctionBuilder, x: Value, want_cos: bool) -> Value {
    let two_over_pi = c(b, std::f64::consts::FRAC_2_PI);
    let t = b.ins().fmul(x, two_over_pi);
    let k = b.ins().nearest(t);
    let mut r = x;
    for part in PIO2_PARTS {
        let p = c(b, part);
        let kp = b.ins().fmul(k, p);
        r = b.ins().fsub(r, kp);
    }
    let (s, co) = sincos_poly(b, r);
    let ki = b.ins().fcvt_to_sint_sat(types::I64, k);
    let q = if want_cos { b.ins().iadd_imm_s(ki, 1) } else { ki };
    let q = b.ins().band_imm_s(q, 3);
    // sin(x) by quadrant: s, c, -s, -c; cos(x) = sin(x + pi/2) shifts the quadrant by one.
    let ns = b.ins().fneg(s);
    let nc = b.ins().fneg(co);
    let use_cos = b.ins().band_imm_s(q, 1);
    let negate = b.ins().band_imm_s(q, 2);
    let pos = b.ins().select(use_cos, co, s);
    let neg = b.ins().select(use_cos, nc, ns);
    b.ins().select(negate, neg, pos)
}

pub fn pow(b: &mut FunctionBuilder, a: Value, e: Value) -> Value {
    let aa = b.ins().fabs(a);
    let la = log(b, aa);
    let t = b.ins().fmul(e, la);
    let r = exp(b, t);
    // Negative base: NaN unless the exponent is an integer; negative if it is odd.
    let zero = c(b, 0.0);
    let neg_base = b.ins().fcmp(FloatCC::LessThan, a, zero);
    let fl = b.ins().floor(e);
    let integral = b.ins().fcmp(FloatCC::Equal, fl, e);
    let half = c(b, 0.5);
    let h = b.ins().fmul(e, half);
    let hf = b.ins().floor(h);
    let odd = b.ins().fcmp(FloatCC::NotEqual, hf, h);
    let nr = b.ins().fneg(r);
    let signed = b.ins().select(odd, nr, r);
    let nan = c(b, f64::NAN);
    let neg_val = b.ins().select(integral, signed, nan);
    let r = b.ins().select(neg_base, neg_val, r);
    // x^0 = 1 and 1^y = 1, even for NaN.
    let one = c(b, 1.0);
    let e_zero = b.ins().fcmp(FloatCC::Equal, e, zero);
    let a_one = b.ins().fcmp(FloatCC::Equal, a, one);
    let trivial = b.ins().bor(e_zero, a_one);
    b.ins().select(trivial, one, r)
}
