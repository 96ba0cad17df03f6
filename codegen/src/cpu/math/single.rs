//! The transcendentals of f32 kernels computed in f32 lanes (four per SSE register instead of the
//! two of the f64 route, and no conversions): Cephes' single-precision reductions and minimax
//! polynomials for exp and log; log1p, expm1, tanh, sigmoid and softplus are the f64 module's stable
//! formulas, which call these when their lanes are f32. Integer steps use exact bit tricks, so f32x4 lanes give
//! exactly the scalar results. Maximum errors against the correctly rounded result, asserted by
//! `tests/cpu_math.rs` over every finite f32 range (dense samples plus random bit patterns):
//!
//! | function | method | max error (f32) |
//! |---|---|---|
//! | exp | k = round(x/ln2), r = x - k ln2 (two-part ln2), Cephes degree-7 polynomial, 2^k in two steps (subnormal results rounded once) | 1 ulp |
//! | log | x = m 2^e, m in [sqrt(1/2), sqrt(2)), t = m - 1, Cephes t + t^2 (-1/2 + t P8(t)); subnormal inputs scaled first | 1 ulp |
//! | log1p | u = 1 + x; x if u == 1, else log(u) x / (u - 1) (Goldberg) | 2 ulp |
//! | expm1 | u = exp(x); x if u == 1, else (u - 1) x / log(u) (Kahan) | 2 ulp |
//! | tanh | copysign(e / (e + 2), x), e = expm1(2 min(abs(x), 20)) | 3 ulp |
//! | sigmoid | e = exp(-abs(x)); r = 1/(1+e); r or e r | 2 ulp |
//! | softplus | max(x, 0) + log1p(exp(-abs(x))) | 3 ulp |
//!
//! NaN propagates; infinities give the IEEE results. (sin, cos and pow of f32 values still go
//! through f64: their argument reductions need more than f32's 24 bits.)

use super::Lanes;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::Value;

/// ln 2 as Cephes splits it for f32: the high part has 9 significant bits, so k * LN2_HI is exact
/// for the |k| <= 150 of f32's range.
const LN2_HI: f64 = 0.693_359_375;
const LN2_LO: f64 = -2.121_944_4e-4;
/// Cephes expf: exp(r) = 1 + r + r^2 P(r) on [-ln2/2, ln2/2] (coefficients from degree 0).
const EXP_P: [f64; 6] = [
    5.000_000_120_1e-1,
    1.666_666_545_9e-1,
    4.166_579_589_4e-2,
    8.333_451_907_3e-3,
    1.398_199_950_7e-3,
    1.987_569_150_0e-4,
];
/// Cephes logf: log(1 + t) = t - t^2/2 + t^3 P(t) on [sqrt(1/2) - 1, sqrt(2) - 1].
const LOG_P: [f64; 9] = [
    3.333_333_117_4e-1,
    -2.499_999_399_3e-1,
    2.000_071_476_5e-1,
    -1.666_805_766_5e-1,
    1.424_932_278_7e-1,
    -1.242_014_084_6e-1,
    1.167_699_874_0e-1,
    -1.151_461_031_0e-1,
    7.037_683_629_2e-2,
];

impl Lanes<'_, '_> {
    pub(super) fn exp_f32(&mut self, x: Value) -> Value {
        // exp overflows f32 above 88.73 and rounds to 0 below -103.98.
        let (k, r) = self.reduce_by_ln2(x, (89.0, -104.0), (LN2_HI, LN2_LO));
        let p = self.horner(r, &EXP_P);
        let z = self.mul(r, r);
        let y = self.mul_add(p, z, r);
        let y = self.addc(y, 1.0);
        self.scale_by_pow2(y, k)
    }

    pub(super) fn log_f32(&mut self, x: Value) -> Value {
        // Subnormals: scale by 2^23 into the normal range first.
        let min_normal = self.c(f32::MIN_POSITIVE as f64);
        let is_sub = self.cmp(FloatCC::LessThan, x, min_normal);
        let scaled = self.mulc(x, 8_388_608.0);
        let xs = self.sel(is_sub, scaled, x);
        let (m23, zero) = (self.c(-23.0), self.c(0.0));
        let e_adj = self.sel(is_sub, m23, zero);
        let (m, ef) = self.split_exponent(xs);
        let ef = self.add(ef, e_adj);
        // t = m - 1 is exact (Sterbenz) for m in [sqrt(1/2), sqrt(2)].
        let t = self.addc(m, -1.0);
        let z = self.mul(t, t);
        let p = self.horner(t, &LOG_P);
        let tz = self.mul(t, z);
        let y = self.mul(p, tz);
        let ln2_lo = self.c(LN2_LO);
        let y = self.mul_add(ef, ln2_lo, y);
        let minus_half = self.c(-0.5);
        let y = self.mul_add(z, minus_half, y);
        let r = self.add(t, y);
        let ln2_hi = self.c(LN2_HI);
        let r = self.mul_add(ef, ln2_hi, r);
        self.log_special_values(x, r)
    }
}
