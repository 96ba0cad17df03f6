//! Transcendental functions emitted inline as Cranelift IR (no call per element), by one code path
//! for scalars and vectors (`Lanes`): integer steps use exact bit tricks instead of conversions and
//! selects become bitselects, so SIMD lanes give exactly the scalar results. Multiply-adds are fused
//! where the CPU has FMA.
//!
//! f64 kernels compute in f64 as in the table below. f32 kernels compute exp, log, log1p, expm1,
//! tanh, sigmoid and softplus in f32 lanes (`single.rs`, with its own table: 1-3 ulp); sin, cos and
//! pow promote to f64, run the same algorithms with series cut to what f32 needs (exp to degree 8,
//! log to s^11, sin and cos to degree 11 and 10: truncation below 2^-31 relative) and round once,
//! within 1 ulp of the correctly rounded f32 result. Maximum errors in f64, measured against Rust's
//! std over wide ranges by `tests/cpu_math.rs` (which asserts these bounds and the f32 ones):
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
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

mod single;

/// ln 2 split so that k * LN2_HI is exact for |k| < 2^20 (fdlibm's constants).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// pi/2 in three parts of 33 bits each (fdlibm's pio2_1, pio2_2, pio2_3).
const PIO2_PARTS: [f64; 3] = [
    f64::from_bits(0x3ff9_21fb_5440_0000),
    f64::from_bits(0x3dd0_b461_1a60_0000),
    f64::from_bits(0x3ba3_198a_2e00_0000),
];

/// 1.5 * 2^52: adding it to an integer-valued f64 below 2^51 in magnitude puts that integer in the
/// low bits of the sum's representation, exactly.
const MAGIC: f64 = 6_755_399_441_055_744.0;
/// The same for f32: 1.5 * 2^23, for integers below 2^22.
const MAGIC_F32: f32 = 12_582_912.0;

/// A float format's layout: (mantissa bits, exponent mask, exponent bias, MAGIC and its bits).
struct Format {
    mantissa_bits: i64,
    exponent_mask: i64,
    bias: f64,
    magic: f64,
    magic_bits: i64,
}

const F64_FORMAT: Format =
    Format { mantissa_bits: 52, exponent_mask: 0x7ff, bias: 1023.0, magic: MAGIC, magic_bits: MAGIC.to_bits() as i64 };
const F32_FORMAT: Format = Format {
    mantissa_bits: 23,
    exponent_mask: 0xff,
    bias: 127.0,
    magic: MAGIC_F32 as f64,
    magic_bits: MAGIC_F32.to_bits() as i64,
};

/// How a math function is emitted: over f64 scalars or f64x2 vectors; for a result that is
/// rounded to f32 (shorter polynomials, see the module doc) or kept in f64; with fused multiply-adds
/// where the CPU has them.
#[derive(Clone, Copy, Debug)]
pub struct MathMode {
    pub vector: bool,
    pub f32_result: bool,
    pub fma: bool,
}

impl MathMode {
    /// Whether the host CPU has FMA (what the JIT, built for the host, may use).
    pub fn host_fma() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// The emitter of one math function over f64 scalars or f64x2 vectors, or (`single`) f32
/// scalars or f32x4 vectors.
struct Lanes<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    vector: bool,
    f32_result: bool,
    fma: bool,
    single: bool,
}

impl Lanes<'_, '_> {
    fn float_ty(&self) -> Type {
        match (self.single, self.vector) {
            (false, false) => types::F64,
            (false, true) => types::F64X2,
            (true, false) => types::F32,
            (true, true) => types::F32X4,
        }
    }
    fn int_ty(&self) -> Type {
        match (self.single, self.vector) {
            (false, false) => types::I64,
            (false, true) => types::I64X2,
            (true, false) => types::I32,
            (true, true) => types::I32X4,
        }
    }
    /// A float constant of the lanes' type (rounded to f32 for single lanes).
    fn c(&mut self, v: f64) -> Value {
        let s = if self.single { self.b.ins().f32const(v as f32) } else { self.b.ins().f64const(v) };
        if self.vector {
            let t = self.float_ty();
            self.b.ins().splat(t, s)
        } else {
            s
        }
    }
    /// An integer constant of the lanes' width (the low 32 bits for single lanes).
    fn ci(&mut self, v: i64) -> Value {
        let s = if self.single {
            self.b.ins().iconst(types::I32, v as i32 as u32 as i64)
        } else {
            self.b.ins().iconst(types::I64, v)
        };
        if self.vector {
            let t = self.int_ty();
            self.b.ins().splat(t, s)
        } else {
            s
        }
    }
    fn flags() -> MemFlagsData {
        MemFlagsData::new().with_endianness(Endianness::Little)
    }
    fn bits(&mut self, x: Value) -> Value {
        let t = self.int_ty();
        self.b.ins().bitcast(t, Self::flags(), x)
    }
    fn float_from_bits(&mut self, i: Value) -> Value {
        let t = self.float_ty();
        self.b.ins().bitcast(t, Self::flags(), i)
    }
    /// A comparison: an i8 for scalars, a lane mask for vectors.
    fn cmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        self.b.ins().fcmp(cc, a, b)
    }
    /// `cond ? a : b` for a condition from `cmp` (combined with `band`/`bor`).
    fn sel(&mut self, cond: Value, a: Value, b: Value) -> Value {
        if self.vector {
            let mask = self.float_from_bits(cond);
            self.b.ins().bitselect(mask, a, b)
        } else {
            self.b.ins().select(cond, a, b)
        }
    }
    fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }
    fn sub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }
    fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }
    fn div(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }
    fn mulc(&mut self, a: Value, k: f64) -> Value {
        let k = self.c(k);
        self.mul(a, k)
    }
    fn addc(&mut self, a: Value, k: f64) -> Value {
        let k = self.c(k);
        self.add(a, k)
    }

    /// `then` (or `value` itself) where `v == value`, else `r`: the special values of a function.
    fn where_equal(&mut self, v: Value, value: f64, then: Option<Value>, r: Value) -> Value {
        let c = self.c(value);
        let hit = self.cmp(FloatCC::Equal, v, c);
        self.sel(hit, then.unwrap_or(c), r)
    }

    /// `a * b + c`, in one rounding where the CPU has FMA.
    fn mul_add(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let t = self.mul(a, b);
            self.add(t, c)
        }
    }

    /// Horner evaluation of sum(coeffs[i] * x^i).
    fn horner(&mut self, x: Value, coeffs: &[f64]) -> Value {
        let mut acc = self.c(*coeffs.last().expect("non-empty"));
        for &k in coeffs.iter().rev().skip(1) {
            let k = self.c(k);
            acc = self.mul_add(acc, x, k);
        }
        acc
    }

    /// `full` terms of a series for f64 results, `short` for results rounded to f32.
    fn terms(&self, full: usize, short: usize) -> usize {
        if self.f32_result {
            short
        } else {
            full
        }
    }

    /// 2^k for an integer-valued k in [-1022, 1023], built from its bits.
    fn pow2(&mut self, k: Value) -> Value {
        let f = self.format();
        let shifted = self.addc(k, f.magic + f.bias);
        let bits = self.bits(shifted);
        let magic = self.ci(f.magic_bits);
        let biased = self.b.ins().isub(bits, magic);
        let e = self.b.ins().ishl_imm_s(biased, f.mantissa_bits);
        self.float_from_bits(e)
    }

    /// exp's argument reduction: x clamped to [lo, hi], k = round(x / ln 2) and r = x - k ln 2
    /// (with ln 2 in two parts, the first exact when multiplied by k): (k, r).
    fn reduce_by_ln2(&mut self, x: Value, (hi, lo): (f64, f64), (ln2_hi, ln2_lo): (f64, f64)) -> (Value, Value) {
        let (hi, lo) = (self.c(hi), self.c(lo));
        let x = self.b.ins().fmin(x, hi);
        let x = self.b.ins().fmax(x, lo);
        let t = self.mulc(x, std::f64::consts::LOG2_E);
        let k = self.b.ins().nearest(t);
        let nk = self.b.ins().fneg(k);
        let (ln2_hi, ln2_lo) = (self.c(ln2_hi), self.c(ln2_lo));
        let r = self.mul_add(nk, ln2_hi, x);
        (k, self.mul_add(nk, ln2_lo, r))
    }

    fn format(&self) -> Format {
        if self.single {
            F32_FORMAT
        } else {
            F64_FORMAT
        }
    }

    /// x = m 2^e for a positive normal x, with m in [sqrt(1/2), sqrt(2)]: (m, e as a float).
    fn split_exponent(&mut self, x: Value) -> (Value, Value) {
        let f = self.format();
        let bits = self.bits(x);
        let eb = self.b.ins().ushr_imm_s(bits, f.mantissa_bits);
        let mask = self.ci(f.exponent_mask);
        let eb = self.b.ins().band(eb, mask);
        let ef = self.int_to_float(eb);
        let ef = self.addc(ef, -f.bias);
        let mant_mask = self.ci((1 << f.mantissa_bits) - 1);
        let one_bits = self.ci((f.bias as i64) << f.mantissa_bits);
        let mant = self.b.ins().band(bits, mant_mask);
        let mant = self.b.ins().bor(mant, one_bits);
        let m = self.float_from_bits(mant);
        let sqrt2 = self.c(std::f64::consts::SQRT_2);
        let big = self.cmp(FloatCC::GreaterThan, m, sqrt2);
        let mh = self.mulc(m, 0.5);
        let m = self.sel(big, mh, m);
        let e1 = self.addc(ef, 1.0);
        (m, self.sel(big, e1, ef))
    }

    /// An integer in [0, 2^51) held in int lanes, as a float.
    fn int_to_float(&mut self, i: Value) -> Value {
        let f = self.format();
        let magic = self.ci(f.magic_bits);
        let bits = self.b.ins().iadd(i, magic);
        let x = self.float_from_bits(bits);
        self.addc(x, -f.magic)
    }

    /// `x mod 4` for an integer-valued x, in [0, 4).
    fn mod4(&mut self, x: Value) -> Value {
        let q = self.mulc(x, 0.25);
        let q = self.b.ins().floor(q);
        let q = self.mulc(q, 4.0);
        self.sub(x, q)
    }

    fn exp(&mut self, x: Value) -> Value {
        if self.single {
            return self.exp_f32(x);
        }
        // An f32 result is inf above 89 and 0 below -104: the narrower clamp keeps 2^k normal.
        let range = if self.f32_result { (100.0, -120.0) } else { (710.0, -746.0) };
        let (k, r) = self.reduce_by_ln2(x, range, (LN2_HI, LN2_LO));
        let degree = self.terms(13, 8);
        let p = self.horner(r, &inv_factorials(degree));
        if self.f32_result {
            let s = self.pow2(k);
            return self.mul(p, s);
        }
        self.scale_by_pow2(p, k)
    }

    /// `y 2^k` in two steps, so that each factor is a normal number: a result past the normal
    /// range (subnormal or infinite) is rounded once, by the last product.
    fn scale_by_pow2(&mut self, y: Value, k: Value) -> Value {
        let half = self.mulc(k, 0.5);
        let k1 = self.b.ins().floor(half);
        let k2 = self.sub(k, k1);
        let (s1, s2) = (self.pow2(k1), self.pow2(k2));
        let y = self.mul(y, s1);
        self.mul(y, s2)
    }

    fn log(&mut self, x: Value) -> Value {
        if self.single {
            return self.log_f32(x);
        }
        // Subnormals: scale into the normal range first. (For f32 results the argument is an f32
        // value or a positive sum or exp of one, never an f64 subnormal.)
        let (xs, e_adj) = if self.f32_result {
            (x, None)
        } else {
            let min_normal = self.c(f64::MIN_POSITIVE);
            let is_sub = self.cmp(FloatCC::LessThan, x, min_normal);
            let scaled = self.mulc(x, 18_014_398_509_481_984.0);
            let xs = self.sel(is_sub, scaled, x);
            let (m54, zero) = (self.c(-54.0), self.c(0.0));
            (xs, Some(self.sel(is_sub, m54, zero)))
        };
        let (m, mut ef) = self.split_exponent(xs);
        if let Some(adj) = e_adj {
            ef = self.add(ef, adj);
        }
        let num = self.addc(m, -1.0);
        let den = self.addc(m, 1.0);
        let s = self.div(num, den);
        let z = self.mul(s, s);
        let coeffs: Vec<f64> = (0..self.terms(11, 6)).map(|i| 1.0 / (2 * i + 1) as f64).collect();
        let p = self.horner(z, &coeffs);
        let two_s = self.add(s, s);
        let logm = self.mul(two_s, p);
        let ln2_lo = self.c(LN2_LO);
        let lo = self.mul_add(ef, ln2_lo, logm);
        let hi = self.mulc(ef, LN2_HI);
        let r = self.add(hi, lo);
        self.log_special_values(x, r)
    }

    /// log(inf) = inf, log(0) = -inf, log(x < 0) = log(NaN) = NaN; else `r`.
    fn log_special_values(&mut self, x: Value, r: Value) -> Value {
        let r = self.where_equal(x, f64::INFINITY, None, r);
        let ninf = self.c(f64::NEG_INFINITY);
        let r = self.where_equal(x, 0.0, Some(ninf), r);
        let zero = self.c(0.0);
        let bad = self.cmp(FloatCC::UnorderedOrLessThan, x, zero);
        let nan = self.c(f64::NAN);
        self.sel(bad, nan, r)
    }

    fn log1p(&mut self, x: Value) -> Value {
        let u = self.addc(x, 1.0);
        let d = self.addc(u, -1.0);
        let lu = self.log(u);
        let q = self.div(x, d);
        let r = self.mul(lu, q);
        let r = self.where_equal(d, 0.0, Some(x), r);
        self.where_equal(x, f64::INFINITY, None, r)
    }

    fn expm1(&mut self, x: Value) -> Value {
        let u = self.exp(x);
        let um1 = self.addc(u, -1.0);
        let lu = self.log(u);
        // (u - 1) * (x / log u): dividing first keeps the product finite up to exp's overflow.
        let q = self.div(x, lu);
        let r = self.mul(um1, q);
        let r = self.where_equal(u, 1.0, Some(x), r);
        let r = self.where_equal(um1, -1.0, None, r);
        self.where_equal(u, f64::INFINITY, None, r)
    }

    fn tanh(&mut self, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let twenty = self.c(20.0);
        let a = self.b.ins().fmin(a, twenty);
        let a2 = self.add(a, a);
        let e = self.expm1(a2);
        let d = self.addc(e, 2.0);
        let t = self.div(e, d);
        // copysign(t, x) on the bits: t is not negative
        let (tb, xb) = (self.bits(t), self.bits(x));
        let sign = if self.single { self.ci(i32::MIN as i64) } else { self.ci(i64::MIN) };
        let s = self.b.ins().band(xb, sign);
        let r = self.b.ins().bor(tb, s);
        self.float_from_bits(r)
    }

    /// exp(-abs(x)): in (0, 1], never overflows (the stable core of sigmoid and softplus).
    fn exp_neg_abs(&mut self, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let na = self.b.ins().fneg(a);
        self.exp(na)
    }

    fn sigmoid(&mut self, x: Value) -> Value {
        let e = self.exp_neg_abs(x);
        let one = self.c(1.0);
        let d = self.add(one, e);
        let pos = self.div(one, d);
        // One division for f32 results: the product's extra f64 rounding is far below f32's.
        let neg = if self.f32_result { self.mul(e, pos) } else { self.div(e, d) };
        let zero = self.c(0.0);
        let ge = self.cmp(FloatCC::GreaterThanOrEqual, x, zero);
        self.sel(ge, pos, neg)
    }

    fn softplus(&mut self, x: Value) -> Value {
        let e = self.exp_neg_abs(x);
        let l = self.log1p(e);
        let zero = self.c(0.0);
        let m = self.b.ins().fmax(x, zero);
        self.add(m, l)
    }

    /// (sin r, cos r) for r in [-pi/4, pi/4].
    fn sincos_poly(&mut self, r: Value) -> (Value, Value) {
        let f = inv_factorials(18);
        let z = self.mul(r, r);
        let (sin_terms, cos_terms) = (self.terms(9, 6), self.terms(10, 6));
        let sin_c: Vec<f64> = (0..sin_terms).map(|i| if i % 2 == 0 { f[2 * i + 1] } else { -f[2 * i + 1] }).collect();
        let cos_c: Vec<f64> = (0..cos_terms).map(|i| if i % 2 == 0 { f[2 * i] } else { -f[2 * i] }).collect();
        let ps = self.horner(z, &sin_c);
        let s = self.mul(r, ps);
        let cs = self.horner(z, &cos_c);
        (s, cs)
    }

    /// sin or cos with Cody-Waite reduction by pi/2.
    fn sin_cos(&mut self, x: Value, want_cos: bool) -> Value {
        let t = self.mulc(x, std::f64::consts::FRAC_2_PI);
        let k = self.b.ins().nearest(t);
        let mut r = x;
        let nk = self.b.ins().fneg(k);
        for part in PIO2_PARTS {
            let part = self.c(part);
            r = self.mul_add(nk, part, r);
        }
        let (s, co) = self.sincos_poly(r);
        // sin(x) by quadrant: s, c, -s, -c; cos(x) = sin(x + pi/2) shifts the quadrant by one.
        let kq = if want_cos { self.addc(k, 1.0) } else { k };
        let q = self.mod4(kq);
        let (one, two, three) = (self.c(1.0), self.c(2.0), self.c(3.0));
        let q1 = self.cmp(FloatCC::Equal, q, one);
        let q3 = self.cmp(FloatCC::Equal, q, three);
        let use_cos = self.b.ins().bor(q1, q3);
        let negate = self.cmp(FloatCC::GreaterThanOrEqual, q, two);
        let ns = self.b.ins().fneg(s);
        let nc = self.b.ins().fneg(co);
        let pos = self.sel(use_cos, co, s);
        let neg = self.sel(use_cos, nc, ns);
        self.sel(negate, neg, pos)
    }

    fn pow(&mut self, a: Value, e: Value) -> Value {
        let aa = self.b.ins().fabs(a);
        let la = self.log(aa);
        let t = self.mul(e, la);
        let r = self.exp(t);
        // Negative base: NaN unless the exponent is an integer; negative if it is odd.
        let zero = self.c(0.0);
        let neg_base = self.cmp(FloatCC::LessThan, a, zero);
        let fl = self.b.ins().floor(e);
        let integral = self.cmp(FloatCC::Equal, fl, e);
        let h = self.mulc(e, 0.5);
        let hf = self.b.ins().floor(h);
        let odd = self.cmp(FloatCC::NotEqual, hf, h);
        let nr = self.b.ins().fneg(r);
        let signed = self.sel(odd, nr, r);
        let nan = self.c(f64::NAN);
        let neg_val = self.sel(integral, signed, nan);
        let r = self.sel(neg_base, neg_val, r);
        // x^0 = 1 and 1^y = 1, even for NaN.
        let one = self.c(1.0);
        let e_zero = self.cmp(FloatCC::Equal, e, zero);
        let a_one = self.cmp(FloatCC::Equal, a, one);
        let trivial = self.b.ins().bor(e_zero, a_one);
        self.sel(trivial, one, r)
    }
}

fn inv_factorials(n: usize) -> Vec<f64> {
    let mut v = vec![1.0];
    for i in 1..=n {
        v.push(v[i - 1] / i as f64);
    }
    v
}

/// The transcendental unary ops computed here (the others are single instructions).
pub fn is_transcendental(op: kiln_ir::ops::UnaryOp) -> bool {
    use kiln_ir::ops::UnaryOp::*;
    matches!(op, Exp | Log | Log1p | Expm1 | Tanh | Sigmoid | Softplus | Sin | Cos)
}

/// Whether `op` on f32 values is computed in f32 lanes (`single.rs`); the others promote to f64.
pub fn computes_in_f32(op: kiln_ir::ops::UnaryOp) -> bool {
    use kiln_ir::ops::UnaryOp::*;
    matches!(op, Exp | Log | Log1p | Expm1 | Tanh | Sigmoid | Softplus)
}

/// A transcendental unary op on an f64 scalar or an f64x2 vector, or, for f32 results of an op
/// that `computes_in_f32`, on an f32 scalar or an f32x4 vector.
pub fn unary(b: &mut FunctionBuilder, op: kiln_ir::ops::UnaryOp, x: Value, mode: MathMode) -> Value {
    use kiln_ir::ops::UnaryOp::*;
    let single = mode.f32_result && computes_in_f32(op);
    let mut l = Lanes { b, vector: mode.vector, f32_result: mode.f32_result, fma: mode.fma, single };
    match op {
        Exp => l.exp(x),
        Log => l.log(x),
        Log1p => l.log1p(x),
        Expm1 => l.expm1(x),
        Tanh => l.tanh(x),
        Sigmoid => l.sigmoid(x),
        Softplus => l.softplus(x),
        Sin => l.sin_cos(x, false),
        Cos => l.sin_cos(x, true),
        other => unreachable!("{other:?} is not computed by the math module"),
    }
}

/// `a ^ e` on f64 scalars or f64x2 vectors.
pub fn pow(b: &mut FunctionBuilder, a: Value, e: Value, mode: MathMode) -> Value {
    Lanes { b, vector: mode.vector, f32_result: mode.f32_result, fma: mode.fma, single: false }.pow(a, e)
}
