//! Single-precision GEMM for x86-64 with AVX-512, in the BLIS structure: B is packed into panels of
//! 32 columns, A into panels of 8 rows (both zero-padded at the edges; a row-major A's whole panels
//! are read in place), and an 8 x 32 register tile (16 zmm accumulators, two FMA chains per row)
//! runs over a depth block of `KC`. Any strides are accepted for A and B (so transposes are free);
//! C is row-major. Packing copies with vector loads, rows start to end, and asks for rows ahead;
//! the C tile is prefetched before the depth loop.
//!
//! Why not only matrixmultiply: it allocates its packing buffers inside every product, about 2 MB
//! per fmnist-mlp training step; this kernel packs into per-thread buffers that persist, so a
//! steady-state step allocates nothing of that size (`tests/cpu_alloc.rs`). It is also faster here:
//! 90-108 GFLOP/s on one core on the workloads' shapes against matrixmultiply's 60-110 (one core's
//! measured FMA peak is 116; `cargo bench --bench gemm`). On CPUs without AVX-512F, and for f64, the
//! runtime uses matrixmultiply (`available()`).

use std::arch::x86_64::*;

const MR: usize = 8;
const NR: usize = 32;
const KC: usize = 256;
const MC: usize = 128;

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Strided matrices: element (i, j) of A is `a[i * rsa + j * csa]`.
#[derive(Clone, Copy)]
pub struct Operands {
    pub a: *const f32,
    pub rsa: isize,
    pub csa: isize,
    pub b: *const f32,
    pub rsb: isize,
    pub csb: isize,
    /// Row-major with row stride `ldc`.
    pub c: *mut f32,
    pub ldc: usize,
}

// SAFETY: plain addresses; whoever calls `sgemm` with them (from any thread) guarantees validity,
// and the runtime gives concurrent calls disjoint blocks of C.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

/// C[m x n] = A[m x k] B[k x n] for rows [0, m) of the operands.
///
/// # Safety
/// The CPU must support AVX-512F, and the operands must describe valid matrices of m x k, k x n
/// and m x n elements; C must not overlap A or B.
pub unsafe fn sgemm(m: usize, k: usize, n: usize, op: Operands) {
    // SAFETY (both calls): forwarded from the caller.
    if m * k * n <= SMALL_PRODUCT && unsafe { sgemm_small(m, k, n, op) } {
        return;
    }
    PACK.with(|cell| {
        let (apack, bpack) = &mut *cell.borrow_mut();
        reserve(apack, bpack, n);
        // SAFETY: forwarded from the caller.
        unsafe { sgemm_with(m, k, n, op, apack, bpack) }
    })
}

/// Products of at most this many multiply-adds skip packing (`sgemm_small`): at batch 16 a layer's
/// product is a microsecond, and packing and edge tiles were most of it.
const SMALL_PRODUCT: usize = 1 << 15;

/// A small product without packing, when B is row-major: each row of C accumulates rows of B, 16
/// columns per register (masked at the end), four rows of C at a time. Returns false for other
/// layouts of B.
///
/// # Safety
/// As `sgemm`.
#[target_feature(enable = "avx512f")]
unsafe fn sgemm_small(m: usize, k: usize, n: usize, op: Operands) -> bool {
    let lanes = |len: usize| if len >= 16 { 0xffff } else { ((1u32 << len) - 1) as u16 };
    // SAFETY (all reads and writes below): elements (i < m, p < k) of A, (p < k, j < n) of B and
    // (i, j) of C, by the operands' strides; masked lanes are neither read nor written.
    unsafe {
        if op.csb != 1 {
            return false;
        }
        // Four rows of C by up to 64 columns at a time: 16 independent accumulator chains.
        for i0 in (0..m).step_by(4) {
            let rows = 4.min(m - i0);
            for j0 in (0..n).step_by(64) {
                let chunks = (n - j0).div_ceil(16).min(4);
                let masks: [u16; 4] = std::array::from_fn(|t| if t < chunks { lanes(n - j0 - 16 * t) } else { 0 });
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                for p in 0..k {
                    let row = op.b.offset(p as isize * op.rsb).add(j0);
                    let b: [__m512; 4] = std::array::from_fn(|t| _mm512_maskz_loadu_ps(masks[t], row.add(16 * t)));
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        let a = _mm512_set1_ps(*op.a.offset((i0 + r) as isize * op.rsa + p as isize * op.csa));
                        for t in 0..chunks {
                            acc[t] = _mm512_fmadd_ps(a, b[t], acc[t]);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    let c = op.c.add((i0 + r) * op.ldc + j0);
                    for t in 0..chunks {
                        _mm512_mask_storeu_ps(c.add(16 * t), masks[t], acc[t]);
                    }
                }
            }
        }
    }
    true
}

thread_local! {
    // Packing buffers live per thread, so a steady-state product allocates nothing.
    static PACK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

fn reserve(apack: &mut Vec<f32>, bpack: &mut Vec<f32>, n: usize) {
    let (alen, blen) = (MC.div_ceil(MR) * MR * KC, n.div_ceil(NR) * NR * KC);
    if apack.len() < alen {
        apack.resize(alen, 0.0);
    }
    if bpack.len() < blen {
        bpack.resize(blen, 0.0);
    }
}

/// Sizes the packing buffers of this thread and of every thread of the pool for products with up
/// to `n` columns, so no call allocates them later, whichever threads it runs on.
pub fn reserve_packing(n: usize) {
    let on_this_thread = || {
        PACK.with(|cell| {
            let (apack, bpack) = &mut *cell.borrow_mut();
            reserve(apack, bpack, n)
        })
    };
    super::team::Team::global().broadcast(&on_this_thread);
}

#[target_feature(enable = "avx512f")]
unsafe fn sgemm_with(m: usize, k: usize, n: usize, op: Operands, apack: &mut [f32], bpack: &mut [f32]) {
    let mut pc = 0;
    while pc < k.max(1) {
        // Depth blocks of equal size (784 = 4 x 196, not 3 x 256 + 16): a thin last block would
        // cost a whole pass over C for little arithmetic.
        let kc = k.div_ceil(k.div_ceil(KC).max(1)).min(k - pc);
        // SAFETY: pack reads stay inside the k x n operand; the caller guarantees its validity.
        unsafe { pack_b(bpack, op, pc, kc, n) };
        let mut ic = 0;
        while ic < m {
            let mc = MC.min(m - ic);
            // Whole panels of a row-major A are read in place: 8 rows of at most KC contiguous
            // values, which stay in L1 while they meet every panel of B. (A transposed A is still
            // packed: read in place, each depth step would be a row of its own, a page apart.)
            let in_place = op.csa == 1;
            let packed_from = if in_place { mc / MR * MR } else { 0 };
            unsafe { pack_a(apack, op, ic + packed_from, mc - packed_from, pc, kc) };
            for jr in (0..n).step_by(NR) {
                for ir in (0..mc).step_by(MR) {
                    let (rows, cols) = (MR.min(mc - ir), NR.min(n - jr));
                    let b = bpack[jr / NR * NR * kc..].as_ptr();
                    // SAFETY: the tile lies inside C (rows, cols clipped), panels are padded, and
                    // in-place panels are whole rows [ic + ir, +MR) and depth [pc, pc + kc) of A.
                    unsafe {
                        let c = op.c.add((ic + ir) * op.ldc + jr);
                        if ir < packed_from {
                            let a = op.a.offset((ic + ir) as isize * op.rsa + pc as isize);
                            kernel::<true>(kc, a, op.rsa as usize, b, c, op.ldc, rows, cols, pc > 0);
                        } else {
                            let a = apack[(ir - packed_from) / MR * MR * kc..].as_ptr();
                            kernel::<false>(kc, a, MR, b, c, op.ldc, rows, cols, pc > 0);
                        }
                    }
                }
            }
            ic += mc;
        }
        if k == 0 {
            break;
        }
        pc += kc;
    }
}

/// Packs rows [ic, ic + mc) and depth [pc, pc + kc) of A into panels of MR rows: panel p holds
/// `kc` groups of MR consecutive row values. The two layouts products meet (A row-major, or a
/// transposed operand read with unit row stride) are copied with vector loads; others element by
/// element.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(dst: &mut [f32], op: Operands, ic: usize, mc: usize, pc: usize, kc: usize) {
    assert!(dst.len() >= mc.div_ceil(MR) * MR * kc, "A packing buffer sized by reserve()");
    let at = |i: usize, p: usize| (ic + i) as isize * op.rsa + (pc + p) as isize * op.csa;
    if op.rsa == 1 {
        // A transposed operand: depth p is a contiguous row of the stored matrix. Reading it from
        // start to end, panel after panel, keeps the reads sequential (the hardware prefetches
        // them; a panel at a time would touch one row per page).
        let full = mc / MR;
        for p in 0..kc {
            for panel in 0..full {
                if p + PREFETCH_ROWS < kc && panel % 2 == 0 {
                    prefetch(op.a.wrapping_offset(at(panel * MR, p + PREFETCH_ROWS)));
                }
                // SAFETY: rows panel*MR.. +MR < mc, depth p < kc; the panel has room (asserted).
                unsafe {
                    let v = _mm256_loadu_ps(op.a.offset(at(panel * MR, p)));
                    _mm256_storeu_ps(dst.as_mut_ptr().add(panel * MR * kc + p * MR), v);
                }
            }
        }
    }
    for (panel, i0) in (0..mc).step_by(MR).enumerate() {
        // SAFETY (all blocks below): the panel has room for kc * MR values (asserted above), and
        // every read is element (row < m, depth < k) of the caller's operand.
        let out = unsafe { dst.as_mut_ptr().add(panel * MR * kc) };
        let full = i0 + MR <= mc;
        if full && op.rsa == 1 {
            // copied below, a whole row of A^T at a time
        } else if full && op.csa == 1 {
            let rows: [*const f32; MR] = std::array::from_fn(|i| unsafe { op.a.offset(at(i0 + i, 0)) });
            let whole = kc / 8 * 8;
            for p in (0..whole).step_by(8) {
                unsafe {
                    let t = transpose8(std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(p))));
                    for (q, v) in t.into_iter().enumerate() {
                        _mm256_storeu_ps(out.add((p + q) * MR), v);
                    }
                }
            }
            for p in whole..kc {
                for (i, row) in rows.iter().enumerate() {
                    unsafe { *out.add(p * MR + i) = *row.add(p) };
                }
            }
        } else {
            for p in 0..kc {
                for i in 0..MR {
                    let v = if i0 + i < mc { unsafe { *op.a.offset(at(i0 + i, p)) } } else { 0.0 };
                    unsafe { *out.add(p * MR + i) = v };
                }
            }
        }
    }
}

/// Packs depth [pc, pc + kc) of B into panels of NR columns: panel q holds `kc` rows of NR values,
/// zero-padded past column n. Row-major B and transposed B (unit row stride) are copied with
/// vector loads; other layouts element by element.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(dst: &mut [f32], op: Operands, pc: usize, kc: usize, n: usize) {
    assert!(dst.len() >= n.div_ceil(NR) * NR * kc, "B packing buffer sized by reserve()");
    let at = |p: usize, j: usize| (pc + p) as isize * op.rsb + j as isize * op.csb;
    if op.csb == 1 {
        // Row-major B: row after row, each from start to end (sequential reads, which the hardware
        // prefetches; a panel at a time would touch one row per page). Masked loads read only the
        // columns that exist and zero the rest of the last panel.
        for p in 0..kc {
            for (panel, j0) in (0..n).step_by(NR).enumerate() {
                let cols = NR.min(n - j0);
                let lo = ((1u32 << cols.min(16)) - 1) as u16;
                let hi = ((1u64 << cols.saturating_sub(16)) - 1) as u16;
                if p + PREFETCH_ROWS < kc {
                    prefetch(op.b.wrapping_offset(at(p + PREFETCH_ROWS, j0)));
                }
                // SAFETY: columns j0..j0+cols of row p exist; the panel has room (asserted).
                unsafe {
                    let row = op.b.offset(at(p, j0));
                    let out = dst.as_mut_ptr().add(panel * NR * kc + p * NR);
                    _mm512_storeu_ps(out, _mm512_maskz_loadu_ps(lo, row));
                    _mm512_storeu_ps(out.add(16), _mm512_maskz_loadu_ps(hi, row.add(16)));
                }
            }
        }
        return;
    }
    for (panel, j0) in (0..n).step_by(NR).enumerate() {
        // SAFETY (all blocks below): the panel has room for kc * NR values (asserted above), and
        // every read is element (depth < k, column < n) of the caller's operand.
        let out = unsafe { dst.as_mut_ptr().add(panel * NR * kc) };
        let cols = NR.min(n - j0);
        if op.csb == 1 {
            // copied below, a whole row at a time
        } else if op.rsb == 1 && cols == NR {
            let whole = kc / 8 * 8;
            for jb in (0..NR).step_by(8) {
                let columns: [*const f32; 8] = std::array::from_fn(|j| unsafe { op.b.offset(at(0, j0 + jb + j)) });
                for p in (0..whole).step_by(8) {
                    unsafe {
                        let t = transpose8(std::array::from_fn(|j| _mm256_loadu_ps(columns[j].add(p))));
                        for (q, v) in t.into_iter().enumerate() {
                            _mm256_storeu_ps(out.add((p + q) * NR + jb), v);
                        }
                    }
                }
                for p in whole..kc {
                    for (j, col) in columns.iter().enumerate() {
                        unsafe { *out.add(p * NR + jb + j) = *col.add(p) };
                    }
                }
            }
        } else {
            for p in 0..kc {
                for j in 0..NR {
                    let v = if j < cols { unsafe { *op.b.offset(at(p, j0 + j)) } } else { 0.0 };
                    unsafe { *out.add(p * NR + j) = v };
                }
            }
        }
    }
}

/// How many rows ahead the packing loops ask for the rows they will read. The operands of a
/// training step's products come from memory, and their rows lie a page or more apart when split
/// across cores, where the hardware prefetcher does not follow.
const PREFETCH_ROWS: usize = 8;

/// Asks for the cache line at `p` (never faults, whatever the address).
#[inline(always)]
fn prefetch(p: *const f32) {
    // SAFETY: prefetching is a hint; it does not access memory architecturally.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

/// Transposes an 8 x 8 block held as eight rows: lane i of result q is lane q of row i.
#[target_feature(enable = "avx512f")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// The 8 x 32 micro-kernel: C[rows x cols] (+)= Apanel Bpanel over depth kc.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const ROW_MAJOR_A: bool>(
    kc: usize,
    a: *const f32,
    a_stride: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // The tile of C is written (or read and written) after the loop: ask for its lines now, so
    // their misses overlap the arithmetic instead of stalling the stores.
    for i in 0..rows {
        prefetch(c.wrapping_add(i * ldc));
        prefetch(c.wrapping_add(i * ldc + 16));
    }
    // Row i of A's panel: at a + i a_stride, depth p at +p (row-major A, read in place); or all
    // rows side by side, depth p at + p a_stride (a packed panel, or a transposed A in place).
    let row_of: [*const f32; MR] =
        std::array::from_fn(|i| if ROW_MAJOR_A { a.wrapping_add(i * a_stride) } else { a.wrapping_add(i) });
    let step = if ROW_MAJOR_A { 1 } else { a_stride };
    for p in 0..kc {
        // SAFETY: the B panel holds kc * NR values; A's rows hold kc values at `step` apart.
        let (b0, b1) = unsafe { (_mm512_loadu_ps(b.add(p * NR)), _mm512_loadu_ps(b.add(p * NR + 16))) };
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(unsafe { *row_of[i].add(p * step) });
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    if rows == MR && cols == NR {
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the full tile lies inside C.
            unsafe {
                let ci = c.add(i * ldc);
                let (mut v0, mut v1) = (row[0], row[1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_loadu_ps(ci));
                    v1 = _mm512_add_ps(v1, _mm512_loadu_ps(ci.add(16)));
                }
                _mm512_storeu_ps(ci, v0);
                _mm512_storeu_ps(ci.add(16), v1);
            }
        }
    } else {
        let mut tile = [0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            unsafe {
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR), row[0]);
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR + 16), row[1]);
            }
        }
        for i in 0..rows {
            for j in 0..cols {
                // SAFETY: (i, j) is inside the clipped tile.
                unsafe {
                    let ci = c.add(i * ldc + j);
                    *ci = if accumulate { *ci + tile[i * NR + j] } else { tile[i * NR + j] };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], sa: (usize, usize), b: &[f32], sb: (usize, usize)) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * sa.0 + p * sa.1] as f64 * b[p * sb.0 + j * sb.1] as f64).sum();
            }
        }
        c
    }

    #[test]
    fn matches_naive_on_edges_strides_and_depth_blocks() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // The first few take the small path (no packing), the rest the blocked one.
        let shapes = [
            (1, 1, 1),
            (8, 1, 32),
            (16, 20, 64),
            (3, 0, 5),
            (16, 10, 70),
            (5, 37, 3),
            (7, 300, 33),
            (129, 513, 65),
            (200, 257, 31),
        ];
        for &(m, k, n) in &shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0).collect();
                // a transposed operand is stored as [k, m] (resp. [n, k])
                let sa = if ta { (1, m) } else { (k, 1) };
                let sb = if tb { (1, k) } else { (n, 1) };
                let mut c = vec![f32::NAN; m * n];
                let op = Operands {
                    a: a.as_ptr(),
                    rsa: sa.0 as isize,
                    csa: sa.1 as isize,
                    b: b.as_ptr(),
                    rsb: sb.0 as isize,
                    csb: sb.1 as isize,
                    c: c.as_mut_ptr(),
                    ldc: n,
                };
                unsafe { sgemm(m, k, n, op) };
                let want = naive(m, k, n, &a, sa, &b, sb);
                for (i, (&g, &w)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}x{k}x{n} t={ta},{tb} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }
}
