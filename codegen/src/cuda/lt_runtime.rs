//! cuBLASLt for the products that `lt` gives their bias epilogue: one descriptor set per product
//! per built function (float32 compute, no TF32; `BIAS` or `RELU_BIAS`), its algorithm taken from
//! cuBLASLt's heuristic then, outside any graph capture, and each call on the lane's stream with
//! the lane's cuBLAS workspace. Row-major through the same identity as the cuBLAS products
//! (`C^T = B^T A^T`: cuBLASLt's A is kiln's `b`, its B kiln's `a`), so the bias, a float per
//! column of kiln's output, is cuBLASLt's vector over the rows of its column-major D. Every
//! failure is an `Err` naming the product; a pointer less aligned than the heuristic assumed is
//! refused before the call.

use super::lt::LtGemm;
use super::runtime::Gpu;
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys as lt_sys;
use kiln_ir::{Error, Result};
use std::ffi::c_void;

/// The alignment cuBLASLt's heuristic assumes of every pointer where not told otherwise (its
/// default preference), which every kiln allocation has; checked before each call.
const ALIGNMENT: u64 = 256;

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
    /// Descriptors for `g` and the algorithm cuBLASLt's heuristic picks for them on `gpu`, with up
    /// to a lane's workspace.
    pub fn new(gpu: &Gpu, g: &LtGemm) -> Result<LtProduct> {
        use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
        let handle = gpu.lt_handle()?;
        let mm = &g.mm;
        let name = format!("{} ({})", mm.name, g.describe());
        let err = |what: &str| lt_err(format!("{what} for {name}"));
        let desc =
            lt::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt_sys::cudaDataType_t::CUDA_R_32F)
                .map_err(err("creating the product's descriptor"))?;
        let mut product = LtProduct { handle, desc, layouts: vec![], algo: None, name: name.clone() };
        let (m, n, k) = (mm.m as u64, mm.n as u64, mm.k as u64);
        // Column-major, as stored: kiln's `b` ([k, n] row-major, or [n, k] transposed), then `a`.
        let stored = |transposed: bool, rows: u64, cols: u64| if transposed { (cols, rows) } else { (rows, cols) };
        let (a_rows, a_cols) = stored(mm.b_transposed, n, k);
        let (b_rows, b_cols) = stored(mm.a_transposed, k, m);
        let f32 = lt_sys::cudaDataType_t::CUDA_R_32F;
        for (rows, cols) in [(a_rows, a_cols), (b_rows, b_cols), (n, m)] {
            let layout =
                lt::create_matrix_layout(f32, rows, cols, rows as i64).map_err(err("creating a matrix layout"))?;
            product.layouts.push(layout);
        }
        let op = |t: bool| {
            if t {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let epilogue = if g.relu {
            lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS
        } else {
            lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        };
        // SAFETY: the descriptor is this product's; each value has the attribute's type.
        unsafe {
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &op(mm.b_transposed)).map_err(err("setting TRANSA"))?;
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &op(mm.a_transposed)).map_err(err("setting TRANSB"))?;
            set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue).map_err(err("setting the epilogue"))?;
        }
        let pref = lt::create_matmul_pref().map_err(err("creating a preference"))?;
        let (_, _, workspace_bytes) = gpu.lane_stream_and_workspace(0)?;
        // SAFETY: the preference and every descriptor are alive; the preference is freed after.
        let heuristic = unsafe {
            let bytes = workspace_bytes as u64;
            let set = lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            );
            let l = &product.layouts;
            let found = set.and_then(|_| lt::get_matmul_algo_heuristic(handle.0, desc, l[0], l[1], l[2], l[2], pref));
            let _ = lt::destroy_matmul_pref(pref);
            found.map_err(err("finding an algorithm (cuBLASLt's heuristic)"))?
        };
        product.algo = Some(heuristic.algo);
        Ok(product)
    }

    /// Enqueues `c = relu?(a b + bias)` on lane `lane`'s stream (also while capturing).
    ///
    /// # Safety
    /// The pointers must be device buffers of the sizes the product implies (checked by the
    /// lowering), `bias` a float per column.
    pub unsafe fn run(&self, gpu: &Gpu, lane: usize, a: u64, b: u64, bias: u64, c: u64) -> Result<()> {
        use lt_sys::cublasLtMatmulDescAttributes_t as Attr;
        if let Some(p) = [a, b, bias, c].into_iter().find(|p| p % ALIGNMENT != 0) {
            return Err(Error::Invalid(format!(
                "cuBLASLt: {}: a buffer at {p:#x} is not {ALIGNMENT}-byte aligned, as the algorithm chosen assumes",
                self.name
            )));
        }
        let algo = self.algo.as_ref().expect("an algorithm is chosen when the product is made");
        let (stream, workspace, bytes) = gpu.lane_stream_and_workspace(lane)?;
        let err = |what: &str| lt_err(format!("{what} for {}", self.name));
        set_desc(self.desc, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias).map_err(err("setting the bias"))?;
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
        .map_err(err("the product"))
    }
}
