//! Random ops from a counter-based generator, Philox 4x32-10 (Salmon et al., SC'11). Randomness is
//! part of the graph: a random node reads a state, an `i64[2]` shared variable `[seed, call]`, and the
//! user API advances `call` by one on every call of a function that reads the state. Each node has its
//! own `stream` id, so two random nodes never draw the same numbers. Every backend reproduces this
//! mapping bit for bit; it is defined here once:
//!
//! - key = `[seed as u32, (seed >> 32) as u32]`; counter of block `b` = `[b, stream, call, call >> 32]`.
//! - f32 uniform (and bernoulli, any dtype): element `i` is word `i % 4` of block `i / 4`,
//!   `u = (w >> 8) * 2^-24` in [0, 1); bernoulli is `(w >> 8) < p * 2^24`, exact in f64.
//! - f64 uniform: element `i` uses words `2(i%2), 2(i%2)+1` of block `i / 2`:
//!   `u = ((w0 << 21) ^ (w1 >> 11)) * 2^-53` (53 bits).
//! - normal (Box-Muller, one output per pair of uniforms): f32 element `i` uses words
//!   `2(i%2), 2(i%2)+1` of block `i / 2`, `u1 = ((w0 >> 8) + 1) * 2^-24` in (0, 1],
//!   `u2 = (w1 >> 8) * 2^-24`; f64 element `i` uses block `i`, `u1` from words 0,1 (53 bits, +1 ulp
//!   so it is never 0), `u2` from words 2,3; `z = sqrt(-2 ln u1) cos(2 pi u2)`, `x = mean + std z`.

use crate::tensor::Tensor;
use crate::types::{shape_str, DType, Dim, TensorType};

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Distribution {
    Uniform { low: f64, high: f64 },
    Normal { mean: f64, std: f64 },
    Bernoulli { p: f64 },
}

#[derive(Clone, PartialEq, Debug)]
pub struct RandomOp {
    pub dist: Distribution,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub stream: u32,
}

impl RandomOp {
    pub fn label(&self) -> String {
        let d = match self.dist {
            Distribution::Uniform { low, high } => format!("uniform{{low={low},high={high}"),
            Distribution::Normal { mean, std } => format!("normal{{mean={mean},std={std}"),
            Distribution::Bernoulli { p } => format!("bernoulli{{p={p}"),
        };
        format!("{d},shape={},stream={}}}", shape_str(&self.shape), self.stream)
    }
}

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox 4x32 with 10 rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four words of Philox block `b` of a stream; the state is `[seed, call]`.
pub fn block(state: [i64; 2], stream: u32, b: u64) -> [u32; 4] {
    let (seed, call) = (state[0] as u64, state[1] as u64);
    philox4x32_10([b as u32, stream, call as u32, (call >> 32) as u32], [seed as u32, (seed >> 32) as u32])
}

/// Blocks `first .. first + 16` of a stream, as four words of 16 lanes (`[word][lane]`): the same
/// numbers as 16 calls of `block`, written lane-parallel so a compiler can vectorize it.
#[inline(always)]
pub fn blocks16(state: [i64; 2], stream: u32, first: u64) -> [[u32; 16]; 4] {
    let (seed, call) = (state[0] as u64, state[1] as u64);
    let mut c0: [u32; 16] = std::array::from_fn(|i| (first as u32).wrapping_add(i as u32));
    let (mut c1, mut c2, mut c3) = ([stream; 16], [call as u32; 16], [(call >> 32) as u32; 16]);
    let (mut k0, mut k1) = (seed as u32, (seed >> 32) as u32);
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for i in 0..16 {
            let p0 = (M0 as u64) * (c0[i] as u64);
            let p1 = (M1 as u64) * (c2[i] as u64);
            let (n0, n2) = ((p1 >> 32) as u32 ^ c1[i] ^ k0, (p0 >> 32) as u32 ^ c3[i] ^ k1);
            (c0[i], c1[i], c2[i], c3[i]) = (n0, p1 as u32, n2, p0 as u32);
        }
    }
    [c0, c1, c2, c3]
}

fn u24(w: u32) -> f64 {
    (w >> 8) as f64 * (1.0 / 16_777_216.0)
}
fn u53(w0: u32, w1: u32) -> f64 {
    ((((w0 as u64) << 21) ^ ((w1 as u64) >> 11)) as f64) * (1.0 / 9_007_199_254_740_992.0)
}

/// Values per Philox block: 4 one-word values, 2 two-word values, or 1 four-word value.
pub fn values_per_block(op: &RandomOp) -> usize {
    let f32 = op.dtype != DType::F64;
    match op.dist {
        Distribution::Bernoulli { .. } => 4,
        Distribution::Uniform { .. } if f32 => 4,
        Distribution::Uniform { .. } => 2,
        Distribution::Normal { .. } if f32 => 2,
        Distribution::Normal { .. } => 1,
    }
}

/// The `n` values of a random op for the given state, as f64 (already in the op's precision).
/// Each Philox block is computed once and all of its words are used.
pub fn sample(op: &RandomOp, state: [i64; 2], n: usize) -> Vec<f64> {
    let f32 = op.dtype != DType::F64;
    let per_block = values_per_block(op);
    let mut out = Vec::with_capacity(n);
    for b in 0..n.div_ceil(per_block) {
        let w = block(state, op.stream, b as u64);
        for lane in 0..per_block.min(n - b * per_block) {
            out.push(match op.dist {
                Distribution::Bernoulli { p } => (((w[lane] >> 8) as f64) < p * 16_777_216.0) as u8 as f64,
                Distribution::Uniform { low, high } if f32 => {
                    let u = u24(w[lane]) as f32;
                    (low as f32 + (high as f32 - low as f32) * u) as f64
                }
                Distribution::Uniform { low, high } => low + (high - low) * u53(w[2 * lane], w[2 * lane + 1]),
                Distribution::Normal { mean, std } if f32 => {
                    let u1 = (((w[2 * lane] >> 8) + 1) as f32) * (1.0 / 16_777_216.0);
                    let u2 = u24(w[2 * lane + 1]) as f32;
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                    (mean as f32 + std as f32 * z) as f64
                }
                Distribution::Normal { mean, std } => {
                    let u1 = u53(w[0], w[1]) + 1.0 / 9_007_199_254_740_992.0;
                    let u2 = u53(w[2], w[3]);
                    mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
                }
            });
        }
    }
    out
}

pub fn infer(op: &RandomOp, state: &TensorType) -> Result<TensorType, String> {
    if *state != TensorType::fixed(DType::I64, &[2]) {
        return Err(format!("the random state must be i64[2] ([seed, call]), got {state}"));
    }
    let ok = match op.dist {
        Distribution::Bernoulli { p } => (0.0..=1.0).contains(&p) && op.dtype != DType::I32 && op.dtype != DType::I64,
        _ => op.dtype.is_float(),
    };
    if !ok {
        return Err(format!("{} cannot produce {}", op.label(), op.dtype));
    }
    Ok(TensorType::new(op.dtype, op.shape.clone()))
}

pub fn eval(op: &RandomOp, state: &Tensor, out: &TensorType) -> Result<Tensor, String> {
    let s = state.to_i64_vec();
    let shape = out.concrete().ok_or("output shape is not concrete")?;
    let n: usize = shape.iter().product();
    if n / 4 >= u32::MAX as usize {
        return Err(format!("{n} random values exceed one stream's 2^32 blocks"));
    }
    Ok(Tensor::from_f64(op.dtype, &shape, &sample(op, [s[0], s[1]], n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn sixteen_blocks_at_once_are_sixteen_blocks() {
        let state = [0x1234_5678_9abc_def0u64 as i64, 0xffff_fffe];
        for first in [0u64, 5, (1 << 32) - 8] {
            let w = blocks16(state, 3, first);
            for lane in 0..16 {
                let one = block(state, 3, first + lane as u64);
                assert_eq!([w[0][lane], w[1][lane], w[2][lane], w[3][lane]], one, "block {}", first + lane as u64);
            }
        }
    }

    /// Known-answer tests from the Random123 distribution (kat_vectors, philox4x32 10 rounds).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0, 0, 0, 0], [0, 0]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }
}
