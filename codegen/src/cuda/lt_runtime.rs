//! cuBLASLt for the products that `lt` sends there: one descriptor set per product per built
//! function (float32 compute, no TF32; a `BIAS` or `RELU_BIAS` epilogue where `lt` found one), its
//! algorithm chosen then, outside any graph capture: the candidates of cuBLASLt's heuristic (at
//! most `CANDIDATES`) each timed on scratch buffers of the product's sizes, the fastest kept, as
//! XLA tunes its products (`KILN_CUDA_LT_TIMED=0`: the heuristic's first, to time what that
//! choice gains). Each call then runs on its lane's stream with the lane's cuBLAS workspace.
//! Row-major through the same identity as the cuBLAS products (`C^T = B^T A^T`: cuBLASLt's A is
//! kiln's `b`, its B kiln's `a`), so a bias, a float per column of kiln's output, is cuBLASLt's
//! vector over the rows of its column-major D. Every failure is an `Err` naming the product; a
//! pointer less aligned than the heuristic assumed is refused before the call.

use super::lt::LtGemm;
use super::runtime::{cuda_err, DeviceBuffer, Gpu};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::{result as driver, sys::CUevent_flags};
use kiln_ir::{Error, Result};
use std::ffi::c_void;
use std::sync::Arc;

/// The alignment cuBLASLt's heuristic assumes of every pointer where not told otherwise (its
/// default preference), which every kiln allocation has; checked before each call.
const ALIGNMENT: u64 = 256;

/// Algorithms asked of cuBLASLt's heuristic for each product, each timed.
const CANDIDATES: usize = 8;

/// Calls of each candidate timed together, after one that warms it up.
const TIMED_CALLS: usize = 3;

/// Whether candidates are timed (`KILN_CUDA_LT_TIMED=0`: the heuristic's first is taken).
fn timed() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !super::switch_from_env(&OFF, "KILN_CUDA_LT_TIMED", "0")
}

fn lt_err(what: String) -> impl Fn(CublasError) -> Error {
    move |e| Error::Invalid(format!("cuBLASLt: {what} failed: {e:?}"))
}

/// A device's cuBLASLt handle, kept for the process as its cuBLAS handle is.
#[derive(Clone, Copy)]
pub struct LtHandle(lt_sys::cublasLtHandle_t);

// SAFETY: the handle is only used under the device's turn, with its context bound (`Gpu::turn`).
unsafe impl Send for LtHandle {}

impl LtHandle {
    pub(super) fn create() -> Result<LtHandle> {
        // SAFETY: only tries to open the library by its usual names.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(Error::Invalid(format!(
                "cuBLASLt was not found (looked for {}; it comes with cuBLAS in the CUDA toolkit's lib folder), \
                 needed by KILN_CUDA_LT=1",
                super::nvrtc::library_names("cublasLt")
            )));
        }
        lt::create_handle().map(LtHandle).map_err(lt_err("creating a handle".into()))
    }
}

/// One product's descriptors and algorithm, freed on drop.
pub struct LtProduct {
    handle: LtHandle,
    desc: lt_sys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A (kiln's `b`), its B (kiln's `a`), and D (kiln's output, also C).
    layouts: Vec<lt_sys::cublasLtMatrixLayout_t>,
    algo: Option<lt_sys::cublasLtMatmulAlgo_t>,
    name: String,
    /// How the algorithm was chosen, for profiles.
    pub choice: String,
}

// SAFETY: as for `LtHandle`.
unsafe impl Send for LtProduct {}

impl Drop for LtProduct {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this product and is destroyed once; a failure
        // here can only leak it.
        unsafe {
            for &l in &self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// Sets a descriptor attribute to `value`.
unsafe fn set_desc<T>(
    desc: lt_sys::cublasLtMatmulDesc_t,
    attr: lt_sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> std::result::Result<(), CublasError> {
    lt::set_matmul_desc_attribute(desc, attr, value as *const T as *const c_void, std::mem::size_of::<T>())
}

impl LtProduct {
    /// Descriptors for `g` and the algorithm chosen for them on `gpu`, with up to a lane's
    /// workspace.
    pub fn new(gpu: &Arc<Gpu>, g: &LtGemm) -> Result<LtProduct> {
        use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
        let handle = gpu.lt_handle()?;
        let mm = &g.mm;
        let name = format!("{} ({})", mm.name, g.describe());
        let err = |what: &str| lt_err(format!("{what} for {name}"));
        let compute = lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let desc = lt::create_matmul_desc(compute, lt_sys::cudaDataType_t::CUDA_R_32F)
            .map_err(err("creating the product's descriptor"))?;
        let mut product =
            LtProduct { handle, desc, layouts: vec![], algo: None, name: name.clone(), choice: String::new() };
        let (m, n, k) = (mm.m as u64, mm.n as u64, mm.k as u64);
        // Column-major, as stored: kiln's `b` ([k, n] row-major, or [n, k] transposed), then `a`.
        let stored = |transposed: bool, rows: u64, cols: u64| if transposed { (cols, rows) } else { (rows, cols) };
        let f32 = lt_sys::cudaDataType_t::CUDA_R_32F;
        for (rows, cols) in [stored(mm.b_transposed, n, k), stored(mm.a_transposed, k, m), (n, m)] {
            let layout =
                lt::create_matrix_layout(f32, rows, cols, rows as i64).map_err(err("creating a matrix layout"))?;
            product.layouts.push(layout);
        }
        use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let epilogue = match &g.epilogue {
            None => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Some(ep) if ep.relu => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
            Some(_) => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        };
        // SAFETY: the descriptor is this product's; each value has the attribute's type.
        unsafe {
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &op(mm.b_transposed)).map_err(err("setting TRANSA"))?;
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &op(mm.a_transposed)).map_err(err("setting TRANSB"))?;
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue).map_err(err("setting the epilogue"))?;
        }
        let candidates = product.candidates(gpu)?;
        let (pick, choice) = if candidates.len() > 1 && timed() {
            let times = product.time(gpu, g, &candidates)?;
            let best = (0..times.len()).min_by(|&a, &b| times[a].total_cmp(&times[b])).expect("candidates");
            let us = |t: f32| t * 1000.0 / TIMED_CALLS as f32;
            let choice = format!(
                "algorithm {} of {} timed: {:.1} us, the heuristic's first {:.1} us",
                best + 1,
                times.len(),
                us(times[best]),
                us(times[0])
            );
            (best, choice)
        } else {
            (0, format!("the heuristic's first of {} algorithms", candidates.len()))
        };
        product.algo = Some(candidates[pick]);
        product.choice = choice;
        Ok(product)
    }

    /// An error of `what` for this product.
    fn err(&self, what: &str) -> impl Fn(CublasError) -> Error {
        lt_err(format!("{what} for {}", self.name))
    }

    /// The algorithms cuBLASLt's heuristic offers for this product, best first (an error where it
    /// offers none).
    fn candidates(&self, gpu: &Gpu) -> Result<Vec<lt_sys::cublasLtMatmulAlgo_t>> {
        let pref = lt::create_matmul_pref().map_err(self.err("creating a preference"))?;
        let (_, _, workspace_bytes) = gpu.lane_stream_and_workspace(0)?;
        let l = &self.layouts;
        // SAFETY: the preference and every descriptor are alive, the results array holds
        // `CANDIDATES` plain structs (all-zero is a valid one); the preference is freed after.
        let (status, results, count) = unsafe {
            let bytes = workspace_bytes as u64;
            let set = lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            );
            let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> = vec![std::mem::zeroed(); CANDIDATES];
            let mut count: std::ffi::c_int = 0;
            let status = set.and_then(|_| {
                lt_sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle.0,
                    self.desc,
                    l[0],
                    l[1],
                    l[2],
                    l[2],
                    pref,
                    CANDIDATES as std::ffi::c_int,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
            });
            let _ = lt::destroy_matmul_pref(pref);
            (status, results, count)
        };
        status.map_err(self.err("asking cuBLASLt's heuristic for algorithms"))?;
        let ok = lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        let found: Vec<_> =
            results.iter().take(count.max(0) as usize).filter(|r| r.state == ok).map(|r| r.algo).collect();
        if found.is_empty() {
            return Err(Error::Invalid(format!("cuBLASLt: its heuristic has no algorithm for {}", self.name)));
        }
        Ok(found)
    }

    /// Milliseconds that `TIMED_CALLS` calls of each candidate take on scratch buffers of the
    /// product's sizes (zeros), on the main stream; infinite for one that fails.
    fn time(&self, gpu: &Arc<Gpu>, g: &LtGemm, candidates: &[lt_sys::cublasLtMatmulAlgo_t]) -> Result<Vec<f32>> {
        let mm = &g.mm;
        let floats = [mm.m * mm.k, mm.k * mm.n, mm.m * mm.n, mm.n];
        let scratch = floats.iter().map(|&f| DeviceBuffer::new(gpu, f * 4)).collect::<Result<Vec<_>>>()?;
        let stream = gpu.stream.cu_stream();
        for s in &scratch {
            // SAFETY: a buffer of `s.bytes` bytes of this device.
            unsafe { driver::memset_d8_async(s.ptr, 0, s.bytes, stream) }.map_err(cuda_err("clearing scratch"))?;
        }
        let bias = g.epilogue.as_ref().map(|_| scratch[3].ptr);
        let (a, b, c) = (scratch[0].ptr, scratch[1].ptr, scratch[2].ptr);
        let event = || gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda_err("creating an event"));
        let (start, end) = (event()?, event()?);
        let mut times = vec![];
        for algo in candidates {
            // SAFETY: the scratch buffers have the product's sizes and are 256-byte aligned.
            let call = || unsafe { self.enqueue(gpu, 0, algo, a, b, bias, c) };
            if call().is_err() {
                times.push(f32::INFINITY);
                continue;
            }
            start.record(&gpu.stream).map_err(cuda_err("recording an event"))?;
            let calls: Result<Vec<()>> = (0..TIMED_CALLS).map(|_| call()).collect();
            end.record(&gpu.stream).map_err(cuda_err("recording an event"))?;
            let ms = start.elapsed_ms(&end).map_err(cuda_err("reading an event"))?;
            times.push(if calls.is_ok() { ms } else { f32::INFINITY });
        }
        gpu.synchronize()?;
        Ok(times)
    }

    /// Enqueues the product (`relu?(a b + bias)` with an epilogue) on lane `lane`'s stream, also
    /// while capturing.
    ///
    /// # Safety
    /// The pointers must be device buffers of the sizes the product implies (checked by the
    /// lowering), `bias` a float per column, present exactly where the product has an epilogue.
    pub unsafe fn run(&self, gpu: &Gpu, lane: usize, a: u64, b: u64, bias: Option<u64>, c: u64) -> Result<()> {
        let algo = self.algo.as_ref().expect("an algorithm is chosen when the product is made");
        self.enqueue(gpu, lane, algo, a, b, bias, c)
    }

    /// As `run`, with `algo`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn enqueue(
        &self,
        gpu: &Gpu,
        lane: usize,
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        a: u64,
        b: u64,
        bias: Option<u64>,
        c: u64,
    ) -> Result<()> {
        use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
        if let Some(p) = [a, b, c].into_iter().chain(bias).find(|p| p % ALIGNMENT != 0) {
            return Err(Error::Invalid(format!(
                "cuBLASLt: {}: a buffer at {p:#x} is not {ALIGNMENT}-byte aligned, as the algorithm chosen assumes",
                self.name
            )));
        }
        let (stream, workspace, bytes) = gpu.lane_stream_and_workspace(lane)?;
        if let Some(bias) = bias {
            set_desc(self.desc, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)
                .map_err(self.err("setting the bias"))?;
        }
        let (one, zero) = (1.0f32, 0.0f32);
        let l = &self.layouts;
        // cuBLASLt's A is kiln's `b`, its B kiln's `a`; C is D (beta 0).
        lt::matmul(
            self.handle.0,
            self.desc,
            &one as *const f32 as *const c_void,
            &zero as *const f32 as *const c_void,
            b as *const c_void,
            l[0],
            a as *const c_void,
            l[1],
            c as *const c_void,
            l[2],
            c as *mut c_void,
            l[2],
            algo,
            workspace as *mut c_void,
            bytes,
            stream as lt_sys::cudaStream_t,
        )
        .map_err(self.err("the product"))
    }
}
