//! The steps of a kernel program that are not loop kernels, run from Rust on the plan's buffers:
//! matrix products through matrixmultiply's packed GEMM (f32, f64; integers by a plain loop),
//! gather and scatter-add with every index checked (an out-of-range index is an error naming the
//! user's line, never an out-of-bounds access), and Philox random numbers (kiln-ir's definition).

use crate::kernel::{Gather, MatMul};
use kiln_ir::ops::random::{block, blocks16, sample};
use kiln_ir::ops::{Distribution, RandomOp};
use kiln_ir::{DType, Error, Loc, Result};

/// Raw views of the plan's buffers for one step. The caller guarantees that each pointer is valid
/// for the buffer length the kernel program declares (checked by `kernel::check_bounds`).
pub struct Bufs<'a> {
    pub ptr: &'a [*mut u8],
    pub len: &'a [usize],
}

impl Bufs<'_> {
    /// # Safety
    /// `T` must be the buffer's element type.
    unsafe fn slice<T>(&self, b: usize) -> &[T] {
        unsafe { std::slice::from_raw_parts(self.ptr[b] as *const T, self.len[b]) }
    }
    /// # Safety
    /// `T` must be the buffer's element type, and the buffer must not be read through another
    /// slice while this one lives (steps never read the buffer they write).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<T>(&self, b: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr[b] as *mut T, self.len[b]) }
    }
}

/// Products with fewer multiply-adds than this run on one core.
pub(super) const PARALLEL_GEMM_MACS: usize = 1 << 18;

type GemmFn<T> =
    unsafe fn(usize, usize, usize, T, *const T, isize, isize, *const T, isize, isize, T, *mut T, isize, isize);

/// Raw operands of one GEMM (strides `[rsa, csa, rsb, csb, rsc, csc]`), shared by the row blocks
/// of a split product.
#[derive(Clone, Copy)]
struct Gemm<T> {
    a: *const T,
    b: *const T,
    c: *mut T,
    strides: [isize; 6],
}
// SAFETY: the blocks of a split product write disjoint rows of `c` and only read `a` and `b`.
unsafe impl<T> Send for Gemm<T> {}
unsafe impl<T> Sync for Gemm<T> {}

impl<T: Copy> Gemm<T> {
    /// C[r0..r1, c0..c1] = A[r0..r1, :] B[:, c0..c1].
    ///
    /// # Safety
    /// The block must lie inside the valid matrices this `Gemm` describes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        (r0, r1): (usize, usize),
        (c0, c1): (usize, usize),
        k: usize,
        f: GemmFn<T>,
        one: T,
        zero: T,
    ) {
        let [rsa, csa, rsb, csb, rsc, csc] = self.strides;
        unsafe {
            let a = self.a.offset(r0 as isize * rsa);
            let b = self.b.offset(c0 as isize * csb);
            let c = self.c.offset(r0 as isize * rsc + c0 as isize * csc);
            f(r1 - r0, k, c1 - c0, one, a, rsa, csa, b, rsb, csb, zero, c, rsc, csc);
        }
    }
}

/// C = A B, split into one block per core when the product is large: along the rows of C when it
/// has more rows than columns, else along its columns, so each core packs only its share of the
/// larger operand (finer splits would pack the other operand again and again).
///
/// # Safety
/// The pointers and strides must describe valid matrices of m x k, k x n and m x n elements.
#[allow(clippy::too_many_arguments)]
/// `after_rows(r0, r1)`, if given, runs on each finished row block by the core that computed it;
/// returns whether it covered every row (it does not when the product is split by columns).
unsafe fn gemm_parallel<T: Copy + Send + Sync>(
    g: Gemm<T>,
    (m, k, n): (usize, usize, usize),
    f: GemmFn<T>,
    (one, zero): (T, T),
    after_rows: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> bool {
    let team = super::team::Team::global();
    let threads = team.threads();
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let blocks = if m * k * n >= PARALLEL_GEMM_MACS && len >= 16 { threads.min(len / 8) } else { 1 };
    // SAFETY (for the closure): each part is a block of the caller's valid matrices, and the parts
    // write disjoint blocks of C.
    let part = |i0: usize, i1: usize| unsafe {
        if by_rows {
            g.block((i0, i1), (0, n), k, f, one, zero);
            if let Some(after) = after_rows {
                after(i0, i1);
            }
        } else {
            g.block((0, m), (i0, i1), k, f, one, zero)
        }
    };
    if blocks <= 1 {
        // SAFETY: the whole product.
        unsafe { g.block((0, m), (0, n), k, f, one, zero) };
        if let Some(after) = after_rows {
            after(0, m);
        }
        return true;
    }
    let per = len.div_ceil(blocks);
    team.run(blocks, &|i| {
        let (i0, i1) = (i * per, ((i + 1) * per).min(len));
        if i0 < i1 {
            part(i0, i1);
        }
    });
    by_rows
}

/// kiln's AVX-512 sgemm where the CPU has AVX-512F (no allocation per product), else
/// matrixmultiply's.
fn sgemm_fastest() -> GemmFn<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::gemm::available() {
        return avx512_sgemm;
    }
    matrixmultiply::sgemm
}

/// matrixmultiply's signature over kiln's AVX-512 kernel (alpha = 1, beta = 0, unit column stride
/// of C, as `matmul` always calls it).
///
/// # Safety
/// As `matrixmultiply::sgemm`; only selected when the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx512_sgemm(
    m: usize,
    k: usize,
    n: usize,
    _alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    _beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    debug_assert_eq!(csc, 1, "C is row-major");
    let op = super::gemm::Operands { a, rsa, csa, b, rsb, csb, c, ldc: rsc as usize };
    unsafe { super::gemm::sgemm(m, k, n, op) }
}

/// Runs a product; `after_rows` (for single products) runs on each finished block of rows. Returns
/// whether `after_rows` covered every row.
pub fn matmul(mm: &MatMul, bufs: &Bufs, after_rows: Option<&(dyn Fn(usize, usize) + Sync)>) -> bool {
    let mut covered = after_rows.is_none();
    let (m, k, n) = (mm.m, mm.k, mm.n);
    // A transposed operand is stored as the matrix it transposes: swap its strides.
    let (rsa, csa) = if mm.a_transposed { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if mm.b_transposed { (1, k as isize) } else { (n as isize, 1) };
    let strides = [rsa, csa, rsb, csb, n as isize, 1];
    for bi in 0..mm.batch {
        let (ao, bo, co) = (bi * mm.a_batch_stride, bi * mm.b_batch_stride, bi * m * n);
        // The integer product of this batch item (a plain loop; not a training path).
        macro_rules! int_product {
            ($t:ty) => {
                int_matmul::<$t>(
                    bufs.slice(mm.a),
                    bufs.slice(mm.b),
                    bufs.slice_mut(mm.c),
                    (ao, bo, co),
                    (m, k, n),
                    strides,
                )
            };
        }
        // SAFETY: the bounds of every batch item were checked when the program was lowered, and
        // each buffer holds elements of `mm.dtype`.
        unsafe {
            match mm.dtype {
                DType::F32 => {
                    let (a, b, c) = (bufs.slice::<f32>(mm.a), bufs.slice::<f32>(mm.b), bufs.slice_mut::<f32>(mm.c));
                    let g = Gemm { a: a[ao..].as_ptr(), b: b[bo..].as_ptr(), c: c[co..].as_mut_ptr(), strides };
                    covered = gemm_parallel(g, (m, k, n), sgemm_fastest(), (1.0, 0.0), after_rows);
                }
                DType::F64 => {
                    let (a, b, c) = (bufs.slice::<f64>(mm.a), bufs.slice::<f64>(mm.b), bufs.slice_mut::<f64>(mm.c));
                    let g = Gemm { a: a[ao..].as_ptr(), b: b[bo..].as_ptr(), c: c[co..].as_mut_ptr(), strides };
                    covered = gemm_parallel(g, (m, k, n), matrixmultiply::dgemm, (1.0, 0.0), after_rows);
                }
                DType::I32 => int_product!(i32),
                DType::I64 => int_product!(i64),
                DType::Bool => unreachable!("type rule rejects bool matmul"),
            }
        }
    }
    covered
}

fn int_matmul<T: Copy + num_like::WrappingArith>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    off: (usize, usize, usize),
    mkn: (usize, usize, usize),
    s: [isize; 6],
) {
    let (m, k, n) = mkn;
    let at = |i: usize, p: usize| off.0 + (i as isize * s[0] + p as isize * s[1]) as usize;
    let bt = |p: usize, j: usize| off.1 + (p as isize * s[2] + j as isize * s[3]) as usize;
    for i in 0..m {
        for j in 0..n {
            let mut acc = T::ZERO;
            for p in 0..k {
                acc = acc.wadd(a[at(i, p)].wmul(b[bt(p, j)]));
            }
            c[off.2 + i * n + j] = acc;
        }
    }
}

mod num_like {
    pub trait WrappingArith: Sized {
        const ZERO: Self;
        fn wadd(self, o: Self) -> Self;
        fn wmul(self, o: Self) -> Self;
    }
    impl WrappingArith for i32 {
        const ZERO: i32 = 0;
        fn wadd(self, o: i32) -> i32 {
            self.wrapping_add(o)
        }
        fn wmul(self, o: i32) -> i32 {
            self.wrapping_mul(o)
        }
    }
    impl WrappingArith for i64 {
        const ZERO: i64 = 0;
        fn wadd(self, o: i64) -> i64 {
            self.wrapping_add(o)
        }
        fn wmul(self, o: i64) -> i64 {
            self.wrapping_mul(o)
        }
    }
}

/// Reads the indices of a gather or scatter as checked positions along an axis of `axis_len`.
fn indices(bufs: &Bufs, idx: usize, dtype: DType, axis_len: usize, at: Loc, op: &str) -> Result<Vec<usize>> {
    // SAFETY: the index buffer holds `dtype` elements.
    let raw: Vec<i64> = unsafe {
        match dtype {
            DType::I32 => bufs.slice::<i32>(idx).iter().map(|&i| i as i64).collect(),
            _ => bufs.slice::<i64>(idx).to_vec(),
        }
    };
    raw.into_iter()
        .map(|i| {
            let j = if i < 0 { i + axis_len as i64 } else { i };
            if j < 0 || j >= axis_len as i64 {
                Err(Error::Runtime {
                    op: op.into(),
                    detail: format!("index {i} out of range for an axis of size {axis_len}"),
                    at,
                })
            } else {
                Ok(j as usize)
            }
        })
        .collect()
}

/// Checks the indices of a gather or scatter without running it (so that a call can fail before
/// any step writes a variable in place).
pub fn check_indices(a: &Gather, idx_dtype: DType, bufs: &Bufs, op: &str) -> Result<()> {
    indices(bufs, a.idx, idx_dtype, a.axis_len, a.at, op).map(|_| ())
}

pub fn gather(a: &Gather, idx_dtype: DType, bufs: &Bufs) -> Result<()> {
    let idx = indices(bufs, a.idx, idx_dtype, a.axis_len, a.at, "take")?;
    let row = a.inner * crate::kernel::elem_size(a.dtype) as usize;
    // SAFETY: lengths were checked at lowering (x = outer*axis_len*inner, out = outer*n*inner) and
    // every index is within the axis; source and destination are different buffers.
    unsafe {
        let (src, dst) = (bufs.ptr[a.src] as *const u8, bufs.ptr[a.out]);
        for o in 0..a.outer {
            for (j, &i) in idx.iter().enumerate() {
                let s = src.add((o * a.axis_len + i) * row);
                let d = dst.add((o * idx.len() + j) * row);
                std::ptr::copy_nonoverlapping(s, d, row);
            }
        }
    }
    Ok(())
}

pub fn scatter_add(a: &Gather, idx_dtype: DType, bufs: &Bufs) -> Result<()> {
    let idx = indices(bufs, a.idx, idx_dtype, a.axis_len, a.at, "take_grad")?;
    fn run<T: Copy + Default + std::ops::AddAssign>(a: &Gather, idx: &[usize], g: &[T], out: &mut [T]) {
        out.fill(T::default());
        for o in 0..a.outer {
            for (j, &i) in idx.iter().enumerate() {
                let (s, d) = ((o * idx.len() + j) * a.inner, (o * a.axis_len + i) * a.inner);
                for e in 0..a.inner {
                    out[d + e] += g[s + e];
                }
            }
        }
    }
    // SAFETY: buffer element types match `dtype`; g and out are different buffers.
    unsafe {
        match a.dtype {
            DType::F32 => run::<f32>(a, &idx, bufs.slice(a.src), bufs.slice_mut(a.out)),
            DType::F64 => run::<f64>(a, &idx, bufs.slice(a.src), bufs.slice_mut(a.out)),
            d => return Err(Error::Invalid(format!("take_grad of {d}"))),
        }
    }
    Ok(())
}

/// Writes one f32 per Philox word, four per block, as `map(word)` (the f32 uniform and bernoulli
/// mappings of kiln-ir's definition, without an intermediate vector).
fn per_word(op: &RandomOp, state: [i64; 2], out: &mut [f32], map: impl Fn(u32) -> f32 + Copy) {
    // Sixteen blocks (64 values) at a time, in AVX-512 where the CPU has it; the rest one by one.
    let mut chunks = out.chunks_exact_mut(64);
    for (c, dst) in (&mut chunks).enumerate() {
        let dst: &mut [f32; 64] = dst.try_into().expect("chunks of 64");
        chunk_fast(state, op.stream, 16 * c as u64, dst, map);
    }
    let done = out.len() / 64 * 64;
    for (i, b) in (done / 4..out.len().div_ceil(4)).enumerate() {
        let w = block(state, op.stream, b as u64);
        for (lane, &word) in w.iter().enumerate().take(out.len() - done - 4 * i) {
            out[done + 4 * i + lane] = map(word);
        }
    }
}

/// Values `64 first/16 ..` of a stream: blocks `first .. first + 16`, each block's four words in
/// order.
#[inline(always)]
fn chunk(state: [i64; 2], stream: u32, first: u64, dst: &mut [f32; 64], map: impl Fn(u32) -> f32) {
    let w = blocks16(state, stream, first);
    for lane in 0..16 {
        for (word, words) in w.iter().enumerate() {
            dst[4 * lane + word] = map(words[lane]);
        }
    }
}

fn chunk_fast(state: [i64; 2], stream: u32, first: u64, dst: &mut [f32; 64], map: impl Fn(u32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        unsafe fn wide(state: [i64; 2], stream: u32, first: u64, dst: &mut [f32; 64], map: impl Fn(u32) -> f32) {
            chunk(state, stream, first, dst, map)
        }
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { wide(state, stream, first, dst, map) };
    }
    chunk(state, stream, first, dst, map)
}

/// `(word >> 8) < threshold` exactly as kiln-ir's `((word >> 8) as f64) < p 2^24`, for an
/// integer comparison that vectorizes: an integer is below a real t iff it is below ceil(t).
fn bernoulli_threshold(p: f64) -> u32 {
    let t = p * 16_777_216.0;
    if t.is_nan() || t <= 0.0 {
        0
    } else if t >= 16_777_216.0 {
        1 << 24
    } else {
        t.ceil() as u32
    }
}

pub fn random(op: &RandomOp, state: usize, out: usize, bufs: &Bufs) {
    // SAFETY: the state buffer is i64[2] (checked at lowering) and `out` holds `op.dtype` elements.
    unsafe {
        let s = bufs.slice::<i64>(state);
        let st = [s[0], s[1]];
        match (op.dist, op.dtype) {
            (Distribution::Bernoulli { p }, DType::F32) => {
                let threshold = bernoulli_threshold(p);
                return per_word(op, st, bufs.slice_mut::<f32>(out), |w| ((w >> 8) < threshold) as u8 as f32);
            }
            (Distribution::Uniform { low, high }, DType::F32) => {
                let (lo, hi) = (low as f32, high as f32);
                // (w >> 8) 2^-24 is exact in f32 as in f64
                let unit = |w: u32| (w >> 8) as f32 * (1.0 / 16_777_216.0);
                return per_word(op, st, bufs.slice_mut::<f32>(out), move |w| lo + (hi - lo) * unit(w));
            }
            _ => {}
        }
        let values = sample(op, [s[0], s[1]], bufs.len[out]);
        match op.dtype {
            DType::F32 => bufs.slice_mut::<f32>(out).iter_mut().zip(values).for_each(|(o, v)| *o = v as f32),
            DType::F64 => bufs.slice_mut::<f64>(out).copy_from_slice(&values),
            DType::Bool => bufs.slice_mut::<u8>(out).iter_mut().zip(values).for_each(|(o, v)| *o = (v != 0.0) as u8),
            DType::I32 => bufs.slice_mut::<i32>(out).iter_mut().zip(values).for_each(|(o, v)| *o = v as i32),
            DType::I64 => bufs.slice_mut::<i64>(out).iter_mut().zip(values).for_each(|(o, v)| *o = v as i64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bernoulli_threshold;

    #[test]
    fn bernoulli_threshold_matches_the_float_comparison() {
        let ps = [0.0, -0.5, 1.0, 1.5, 0.5, 0.3, 0.1, 1e-9, 1.0 - 1e-9, 0.25 + 1e-12, f64::NAN, f64::INFINITY];
        let xs = (0..1u32 << 24).step_by(4093).chain([0, 1, (1 << 24) - 1, 5_033_164, 5_033_165, 8_388_608]);
        for p in ps {
            let t = bernoulli_threshold(p);
            for x in xs.clone() {
                assert_eq!(x < t, (x as f64) < p * 16_777_216.0, "p = {p}, x = {x}");
            }
        }
    }
}
