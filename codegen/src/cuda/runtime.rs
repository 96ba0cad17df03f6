//! The CUDA runtime kiln needs, over cudarc's driver API with dynamic loading: one `Gpu` per
//! device ordinal (context, one non-default stream, a cuBLAS handle with a preallocated workspace
//! so products can be captured in CUDA graphs), device buffers freed on drop, resident copies of
//! shared variables, and row-major products through cuBLAS. The main stream, which carries a
//! step's longest chain of dependent steps (`schedule`), has the card's highest priority and the
//! other lanes the lowest, so that where both have blocks waiting for an SM the chain's go first
//! (`KILN_CUDA_PRIORITY=0`: every stream at the default priority, to time the difference). Every
//! failure is an `Err` that says what was looked for; nothing here panics when CUDA is absent.

use crate::bytes::tensor_from_bytes;
use crate::kernel::MatMul;
use crate::Resident;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use kiln_ir::{DType, Error, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// cuBLAS workspace: preallocated so that products can be captured into a CUDA graph.
const CUBLAS_WORKSPACE: usize = 32 << 20;

pub fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Invalid(format!("CUDA: {what} failed: {e:?}"))
}

fn blas_err(what: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error + '_ {
    move |e| Error::Invalid(format!("cuBLAS: {what} failed: {e:?}"))
}

/// Why the CUDA backend cannot run here, or `None` if the driver, cuBLAS and NVRTC all load and
/// a device exists.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: each call only tries to open a shared library by its usual names.
    let (driver, blas) = unsafe { (sys::is_culib_present(), blas_sys::is_culib_present()) };
    let look = super::nvrtc::library_names;
    if !driver {
        return Some(format!("no CUDA driver: libcuda was not found (looked for {})", look("cuda")));
    }
    if !blas {
        return Some(format!(
            "cuBLAS was not found (looked for {}; set LD_LIBRARY_PATH to the CUDA toolkit's lib folder, \
             e.g. /usr/local/cuda/targets/x86_64-linux/lib)",
            look("cublas")
        ));
    }
    if !super::nvrtc::available() {
        return Some(super::nvrtc::missing_reason());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver found no device".into()),
        Err(e) => Some(format!("the CUDA driver could not be initialized: {e:?}")),
    }
}

/// One device: its context, the stream everything runs on, and a cuBLAS handle bound to it.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// NVRTC target: `sm_90` (machine code), or `compute_90` (PTX) with `KILN_CUDA_PTX=1`.
    pub arch: &'static str,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Whether `stream` has a higher priority than the other lanes (`main_stream_priority`): a
    /// step's CUDA graph then keeps each kernel's priority from the stream it was captured on.
    pub prioritized: bool,
    blas: blas_sys::cublasHandle_t,
    workspace: sys::CUdeviceptr,
    /// The cuBLASLt handle, created on first use (`lt_runtime`).
    lt: Mutex<Option<super::lt_runtime::LtHandle>>,
    /// Further streams, each with its own cuBLAS handle and workspace, for steps that run beside
    /// each other (`KILN_CUDA_STREAMS`); created on first use, kept for the process.
    lanes: Mutex<Vec<Lane>>,
    /// Held for each use of the stream and cuBLAS handle (a call, a read-back, a compilation), so
    /// threads sharing a device take turns and a capture never sees another thread's work.
    turn: Mutex<()>,
}

// SAFETY: the cuBLAS handle is used only through `&Gpu` on the thread that holds the context
// (every entry point binds it), and kiln runs one call at a time per device.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

/// A stream beside the main one, with the cuBLAS handle bound to it.
struct Lane {
    stream: Arc<CudaStream>,
    blas: blas_sys::cublasHandle_t,
    workspace: sys::CUdeviceptr,
}

/// A cuBLAS handle bound to `stream`, with its own preallocated workspace (handles on different
/// streams must not share one: their products may run at the same time).
fn blas_for(stream: &CudaStream) -> Result<(blas_sys::cublasHandle_t, sys::CUdeviceptr)> {
    let blas = cudarc::cublas::result::create_handle().map_err(blas_err("creating a handle"))?;
    // SAFETY: the handle was just created; the stream and workspace outlive it (all are kept in
    // the same `Gpu`, which is never dropped).
    let workspace = unsafe {
        cudarc::cublas::result::set_stream(blas, stream.cu_stream() as _).map_err(blas_err("setting the stream"))?;
        let w = result::malloc_sync(CUBLAS_WORKSPACE).map_err(cuda_err("allocating the cuBLAS workspace"))?;
        blas_sys::cublasSetWorkspace_v2(blas, w as *mut std::ffi::c_void, CUBLAS_WORKSPACE)
            .result()
            .map_err(blas_err("setting the workspace"))?;
        w
    };
    Ok((blas, workspace))
}

/// The priority of the device's main stream: the highest the context allows where it allows more
/// than one, unless `KILN_CUDA_PRIORITY=0`. The other lanes keep the default, the lowest.
fn main_stream_priority() -> Result<Option<i32>> {
    static OFF: OnceLock<bool> = OnceLock::new();
    if super::switch_from_env(&OFF, "KILN_CUDA_PRIORITY", "0") {
        return Ok(None);
    }
    let (least, greatest) = result::stream::get_priority_range().map_err(cuda_err("reading the stream priorities"))?;
    Ok((greatest < least).then_some(greatest))
}

impl Gpu {
    /// The streams of lanes `0..count`: lane 0 is the main stream, the others are created once.
    pub fn lane_streams(&self, count: usize) -> Result<Vec<Arc<CudaStream>>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        while lanes.len() + 1 < count {
            let stream = self.ctx.new_stream().map_err(cuda_err("creating a stream"))?;
            let (blas, workspace) = blas_for(&stream)?;
            lanes.push(Lane { stream, blas, workspace });
        }
        Ok(std::iter::once(self.stream.clone())
            .chain(lanes.iter().take(count.saturating_sub(1)).map(|l| l.stream.clone()))
            .collect())
    }

    /// The cuBLAS handle of lane `lane` (see `lane_streams`).
    fn blas_of(&self, lane: usize) -> Result<blas_sys::cublasHandle_t> {
        self.lane(lane).map(|l| l.1)
    }

    /// The stream, cuBLAS handle and workspace of lane `lane` (see `lane_streams`).
    fn lane(&self, lane: usize) -> Result<(sys::CUstream, blas_sys::cublasHandle_t, sys::CUdeviceptr)> {
        if lane == 0 {
            return Ok((self.stream.cu_stream(), self.blas, self.workspace));
        }
        let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let l = lanes.get(lane - 1).ok_or_else(|| Error::Invalid(format!("no CUDA stream lane {lane}")))?;
        Ok((l.stream.cu_stream(), l.blas, l.workspace))
    }

    /// The stream and the workspace (`CUBLAS_WORKSPACE` bytes) of lane `lane`: cuBLASLt's products
    /// there use the lane's cuBLAS workspace, which nothing else on that stream uses at the time.
    pub(super) fn lane_stream_and_workspace(&self, lane: usize) -> Result<(sys::CUstream, sys::CUdeviceptr, usize)> {
        self.lane(lane).map(|(stream, _, workspace)| (stream, workspace, CUBLAS_WORKSPACE))
    }

    /// This device's cuBLASLt handle (created on first use; an error naming the library where
    /// libcublasLt is not found).
    pub(super) fn lt_handle(&self) -> Result<super::lt_runtime::LtHandle> {
        let mut lt = self.lt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = *lt {
            return Ok(h);
        }
        let h = super::lt_runtime::LtHandle::create()?;
        *lt = Some(h);
        Ok(h)
    }

    /// The device with this ordinal (created once per process).
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut gpus = GPUS.get_or_init(Default::default).lock().expect("device table lock");
        if let Some(g) = gpus.get(&ordinal) {
            return Ok(g.clone());
        }
        if let Some(why) = unavailable_reason() {
            return Err(Error::Invalid(format!("Device::Cuda({ordinal}) is not available: {why}")));
        }
        let count = CudaContext::device_count().map_err(cuda_err("cuDeviceGetCount"))?;
        if ordinal >= count as usize {
            return Err(Error::Invalid(format!("Device::Cuda({ordinal}): this machine has {count} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating a context"))?;
        // One stream and no per-buffer events: right for a single-stream runtime, and required for
        // capturing cuBLAS calls into a graph.
        unsafe { ctx.disable_event_tracking() };
        ctx.bind_to_thread().map_err(cuda_err("binding the context"))?;
        let priority = main_stream_priority()?;
        let stream = match priority {
            Some(p) => ctx.new_stream_with_priority(p),
            None => ctx.new_stream(),
        }
        .map_err(cuda_err("creating a stream"))?;
        let (major, minor) = ctx.compute_capability().map_err(cuda_err("reading the compute capability"))?;
        // Machine code for this card (no JIT when a module loads), or PTX with KILN_CUDA_PTX=1.
        let ptx = std::env::var("KILN_CUDA_PTX").is_ok_and(|v| v == "1");
        let arch = format!("{}_{major}{minor}", if ptx { "compute" } else { "sm" });
        let arch: &'static str = Box::leak(arch.into_boxed_str());
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        ctx.bind_to_thread().map_err(cuda_err("binding the context"))?;
        let (blas, workspace) = blas_for(&stream)?;
        let gpu = Arc::new(Gpu {
            ordinal,
            name,
            arch,
            ctx,
            stream,
            prioritized: priority.is_some(),
            blas,
            workspace,
            lt: Mutex::new(None),
            lanes: Mutex::new(vec![]),
            turn: Mutex::new(()),
        });
        gpus.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    /// Exclusive use of this device until the guard drops. Re-entrant on the thread that holds it
    /// (work inside a call may free a buffer, which takes the turn too). Freeing memory or
    /// destroying a graph from another thread while a step is being captured would invalidate the
    /// capture, so those take the turn as well.
    pub fn turn(&self) -> Turn<'_> {
        if HOLDING.with(|h| h.borrow().contains(&self.ordinal)) {
            return Turn { guard: None, ordinal: self.ordinal };
        }
        let guard = self.turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        HOLDING.with(|h| h.borrow_mut().push(self.ordinal));
        Turn { guard: Some(guard), ordinal: self.ordinal }
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda_err("binding the context"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronizing the stream"))
    }

    /// `c = a @ b` (row-major, as `MatMul` describes) on lane `lane`'s stream, through the
    /// column-major identity `C^T = B^T A^T`.
    ///
    /// # Safety
    /// The pointers must be device buffers of the sizes `mm` implies (checked by the lowering).
    pub unsafe fn gemm(&self, lane: usize, mm: &MatMul, a: u64, b: u64, c: u64) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        if mm.m == 0 || mm.n == 0 || mm.batch == 0 {
            return Ok(());
        }
        let blas = self.blas_of(lane)?;
        let (m, n, k) = (mm.m as i32, mm.n as i32, mm.k as i32);
        let (op_b, ldb) = if mm.b_transposed { (CUBLAS_OP_T, k) } else { (CUBLAS_OP_N, n) };
        let (op_a, lda) = if mm.a_transposed { (CUBLAS_OP_T, m) } else { (CUBLAS_OP_N, k) };
        let (lda, ldb) = (lda.max(1), ldb.max(1));
        let (sa, sb, sc) = (mm.a_batch_stride as i64, mm.b_batch_stride as i64, (mm.m * mm.n) as i64);
        let batch = mm.batch as i32;
        let r = match mm.dtype {
            DType::F32 => {
                let (one, zero) = (1.0f32, 0.0f32);
                let (a, b, c) = (a as *const f32, b as *const f32, c as *mut f32);
                if batch == 1 {
                    cudarc::cublas::result::sgemm(blas, op_b, op_a, n, m, k, &one, b, ldb, a, lda, &zero, c, n)
                } else {
                    cudarc::cublas::result::sgemm_strided_batched(
                        blas, op_b, op_a, n, m, k, &one, b, ldb, sb, a, lda, sa, &zero, c, n, sc, batch,
                    )
                }
            }
            DType::F64 => {
                let (one, zero) = (1.0f64, 0.0f64);
                let (a, b, c) = (a as *const f64, b as *const f64, c as *mut f64);
                if batch == 1 {
                    cudarc::cublas::result::dgemm(blas, op_b, op_a, n, m, k, &one, b, ldb, a, lda, &zero, c, n)
                } else {
                    cudarc::cublas::result::dgemm_strided_batched(
                        blas, op_b, op_a, n, m, k, &one, b, ldb, sb, a, lda, sa, &zero, c, n, sc, batch,
                    )
                }
            }
            d => return Err(Error::Invalid(format!("cuBLAS product of {d}"))),
        };
        r.map_err(blas_err(&mm.name))
    }
}

thread_local! {
    /// Ordinals of the devices whose turn this thread holds.
    static HOLDING: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A device's turn, held until dropped (see `Gpu::turn`).
pub struct Turn<'a> {
    guard: Option<std::sync::MutexGuard<'a, ()>>,
    ordinal: usize,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.guard.is_some() {
            HOLDING.with(|h| h.borrow_mut().retain(|&o| o != self.ordinal));
        }
    }
}

/// Device memory, freed when dropped.
pub struct DeviceBuffer {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
    gpu: Arc<Gpu>,
}

impl DeviceBuffer {
    pub fn new(gpu: &Arc<Gpu>, bytes: usize) -> Result<DeviceBuffer> {
        gpu.bind()?;
        // SAFETY: a plain allocation of at least one byte in the bound context.
        let ptr = unsafe { result::malloc_sync(bytes.max(8)) }.map_err(cuda_err("cuMemAlloc"))?;
        Ok(DeviceBuffer { ptr, bytes, gpu: gpu.clone() })
    }

    /// Copies host bytes in (ordered on the stream; pageable memory is staged before the call returns).
    pub fn upload(&self, bytes: &[u8]) -> Result<()> {
        debug_assert!(bytes.len() <= self.bytes);
        if bytes.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        // SAFETY: the buffer holds at least `bytes.len()` bytes.
        unsafe { result::memcpy_htod_async(self.ptr, bytes, self.gpu.stream.cu_stream()) }
            .map_err(cuda_err("copying to the device"))
    }

    /// Copies the buffer's first `out.len()` bytes out, after all work on the stream.
    pub fn download(&self, out: &mut [u8]) -> Result<()> {
        debug_assert!(out.len() <= self.bytes);
        if out.is_empty() {
            return Ok(());
        }
        self.gpu.bind()?;
        // SAFETY: the buffer holds at least `out.len()` bytes; the copy finishes before returning.
        unsafe { result::memcpy_dtoh_async(out, self.ptr, self.gpu.stream.cu_stream()) }
            .map_err(cuda_err("copying from the device"))?;
        self.gpu.synchronize()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _turn = self.gpu.turn();
        if self.gpu.bind().is_ok() {
            // Pending work may still use the buffer; freeing waits for the device to be idle.
            let _ = self.gpu.synchronize();
            // SAFETY: allocated by `new` and freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// A shared variable's value resident on a device.
pub struct CudaResident {
    pub buf: DeviceBuffer,
    pub ordinal: usize,
}

impl Resident for CudaResident {
    fn download(&self, host: &mut Tensor) -> Result<()> {
        let _turn = self.buf.gpu.turn();
        let mut bytes = vec![0u8; self.buf.bytes];
        self.buf.download(&mut bytes)?;
        *host = tensor_from_bytes(host.dtype(), host.shape(), &bytes);
        Ok(())
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
