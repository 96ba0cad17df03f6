//! The CUDA executable. Per shape signature of a call: specialize, lower, emit CUDA C, compile it
//! with NVRTC (cached in memory and on disk), load the module, and allocate every buffer once
//! (temporaries share memory by the same liveness plan as the CPU backend). Shared variables stay
//! resident on the device between calls (updates are written there; the host copy is refreshed
//! only when read). The first call of a specialization launches its steps one by one; later calls
//! replay them as one CUDA graph, captured once (and again only if a shared variable's device
//! memory moved, e.g. after `set_value`; `KILN_CUDA_GRAPHS=0` turns graphs off, for comparison;
//! `KILN_CUDA_PROFILE=1` times every step with events instead). Arguments are checked before
//! anything runs: lengths against the plan, and indices that come from arguments against their
//! axis. The returned outputs and the error word come back as `readback` says (one copy where
//! they lie in its egress).

use super::emit::{emit, DeviceStep, ErrorSite, KernelArg};
use super::nvrtc::{self, Origin};
use super::readback::Readback;
use super::runtime::{cuda_err, CudaResident, DeviceBuffer, Gpu};
use super::schedule::Schedule;
use crate::bytes::tensor_bytes;
use crate::kernel::{elem_size, BufKind, KernelProgram, UpdateWrite};
use crate::profile::StepProfile;
use crate::{Backend, CompileOptions, Executable, Program, SharedValue};
use cudarc::driver::{result, sys, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream};
use kiln_ir::{Error, Result, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// The CUDA backend for one device.
pub struct Cuda {
    pub ordinal: usize,
}

impl Backend for Cuda {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn compile(&self, program: &Program, opts: &CompileOptions) -> Result<Box<dyn Executable>> {
        let gpu = Gpu::get(self.ordinal)?;
        let graphs = std::env::var("KILN_CUDA_GRAPHS").map_or(true, |v| v != "0");
        let profile = StepProfile::requested("KILN_CUDA_PROFILE").map(|steps| Profile { events: vec![], steps });
        let streams = super::with_compile_options(opts, || streams_for(profile.is_some()))?;
        Ok(Box::new(CudaExecutable {
            gpu,
            streams,
            program: program.clone(),
            plans: HashMap::new(),
            order: vec![],
            graphs,
            profile,
            opts: opts.clone(),
        }))
    }

    /// NVRTC's compilation of the specialization's module (into its caches), as `Plan::build`
    /// would compile it; nothing is loaded.
    fn precompile(&self, program: &Program, shapes: &[Vec<usize>], opts: &CompileOptions) -> Result<()> {
        let gpu = Gpu::get(self.ordinal)?;
        super::with_compile_options(opts, || {
            let streams = streams_for(StepProfile::requested("KILN_CUDA_PROFILE").is_some())?;
            let (kp, _, _) = super::specialize_program(program, shapes)?;
            let (_, memory) = super::streams_and_memory(&kp, streams);
            let dp = super::with_target_arch(gpu.arch, || emit(&kp, &memory))?;
            check_compute_capability(&dp.module, &gpu)?;
            nvrtc::compile_module(&dp.module, gpu.arch).map(|_| ())
        })
    }
}

/// The streams a function compiled now plans its steps for: `KILN_CUDA_STREAMS`, or one where
/// every step is timed (`profiled`: events need the steps on one stream).
fn streams_for(profiled: bool) -> Result<Option<usize>> {
    if profiled {
        Ok(Some(1))
    } else {
        super::streams_requested()
    }
}

/// Whether a graph instantiated with its kernels' own priorities failed once (a driver that does
/// not take them): later captures are instantiated without, as one stream's graph.
static NODE_PRIORITIES_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What the streams' priorities are, for a function's compile statistics (a driver that refused
/// the kernels' own priorities in graphs says so here once it has).
fn priorities(gpu: &Gpu) -> String {
    if !gpu.prioritized {
        "stream priorities: none (KILN_CUDA_PRIORITY=0, or the card has one priority)".into()
    } else if NODE_PRIORITIES_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        "stream priorities: the main stream's highest; the driver refused them per kernel in CUDA graphs, \
         which run at the main stream's"
            .into()
    } else {
        "stream priorities: the main stream's highest, kept by each of its kernels in CUDA graphs".into()
    }
}

/// The CUDA graph of what `enqueue` puts on the device's streams. Where the main stream has a
/// higher priority than the other lanes, each kernel keeps the priority of the stream it was
/// captured on (`CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY`), so that the step's longest chain
/// keeps going first inside the graph too; a driver that refuses that gets the graph without.
fn capture(gpu: &Gpu, enqueue: impl Fn() -> Result<()>) -> Result<CudaGraph> {
    use std::sync::atomic::Ordering::Relaxed;
    let capture_with = |flags: sys::CUgraphInstantiate_flags| -> Result<_> {
        gpu.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(cuda_err("beginning a graph capture"))?;
        let enqueued = enqueue();
        let captured = gpu.stream.end_capture(flags);
        enqueued?;
        Ok(captured)
    };
    let no_graph = || Error::Invalid("CUDA graph capture produced no graph".into());
    if gpu.prioritized && !NODE_PRIORITIES_REFUSED.load(Relaxed) {
        match capture_with(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY)? {
            Ok(graph) => return graph.ok_or_else(no_graph),
            Err(_) => NODE_PRIORITIES_REFUSED.store(true, Relaxed),
        }
    }
    capture_with(sys::CUgraphInstantiate_flags(0))?
        .map_err(cuda_err("capturing the step as a CUDA graph"))?
        .ok_or_else(no_graph)
}

enum Exec {
    Launch {
        f: CudaFunction,
        args: Vec<KernelArg>,
        grid: (u32, u32),
        block: (u32, u32),
        /// Bytes of dynamic shared memory (`dynamic_shared.rs`).
        shared: u32,
    },
    Gemm(crate::kernel::MatMul),
    /// A product through cuBLASLt (with its bias epilogue, where it has one), and its descriptors.
    GemmLt(super::lt::LtGemm, super::lt_runtime::LtProduct),
    /// An update that could not be written in place: copied into the variable after the last step.
    Copy {
        from: usize,
        shared: usize,
        bytes: usize,
    },
}

/// Timings and cache use of a specialization, for benchmarks and the compile-time target.
#[derive(Clone, Copy, Debug)]
pub struct CompileStats {
    pub nvrtc_seconds: f64,
    pub origin: Origin,
    pub load_seconds: f64,
}

/// The events that order a plan's lanes: the fork at the start, one after each step that a step on
/// another lane waits for, and one per extra lane to join the main stream at the end.
struct LaneSync {
    fork: Option<CudaEvent>,
    after: Vec<Option<CudaEvent>>,
    joins: Vec<CudaEvent>,
}

struct Plan {
    kp: KernelProgram,
    /// Which lane (stream) runs each device step, and what it waits for on the others.
    schedule: Schedule,
    /// The streams of those lanes (the device's main stream first), fetched once per plan.
    lanes: Vec<Arc<CudaStream>>,
    sync: LaneSync,
    updates: Vec<UpdateWrite>,
    steps: Vec<Exec>,
    /// The kernel (or product) name of each step.
    step_names: Vec<String>,
    /// The device memory of the slots outside the egress (`readback`), kept alive.
    _slots: Vec<Option<DeviceBuffer>>,
    /// The device address of each memory slot.
    slot_ptr: Vec<u64>,
    slot: Vec<Option<usize>>,
    inputs: Vec<Option<DeviceBuffer>>,
    errors: Vec<ErrorSite>,
    /// The returned outputs' and the error word's way back (`readback`).
    readback: Readback,
    /// The buffer of each shared variable (none where the program does not use it).
    shared_buffer: Vec<Option<usize>>,
    scratch: Vec<DeviceBuffer>,
    /// The captured step and the shared-variable addresses it was captured with.
    graph: Option<(CudaGraph, Vec<u64>)>,
    calls: usize,
    code: String,
    stats: CompileStats,
    /// Kernels launched for programmatic dependent launch (`dependent_launch`).
    dependent_launch: bool,
    /// The loaded modules (one per compilation unit), kept alive with the plan's functions.
    _modules: Vec<Arc<CudaModule>>,
}

pub struct CudaExecutable {
    gpu: Arc<Gpu>,
    /// Streams a step may use (`KILN_CUDA_STREAMS`; `None`: as `streams_and_memory` picks).
    streams: Option<usize>,
    program: Program,
    plans: HashMap<Vec<Vec<usize>>, Plan>,
    order: Vec<Vec<Vec<usize>>>,
    /// Replay steps as CUDA graphs (`KILN_CUDA_GRAPHS=0` launches every kernel from the host, for
    /// comparison).
    graphs: bool,
    /// `KILN_CUDA_PROFILE=1`: time every step with events (no graphs) and print the totals when
    /// the function is dropped.
    profile: Option<Profile>,
    /// What the compile fixed for every specialization (an autotune's setting).
    opts: CompileOptions,
}

struct Profile {
    events: Vec<CudaEvent>,
    steps: StepProfile,
}

/// Tiles on tensor cores (`KILN_CUDA_TF32X3=1`) need `mma.sync` for TF32: compute capability 8.0
/// or newer; so do slabs copied asynchronously (`KILN_CUDA_STAGES` above 1: `cp.async`), and
/// programmatic dependent launch (`KILN_CUDA_PDL=1`: `griddepcontrol`) and thread block clusters
/// (`KILN_CUDA_CLUSTERS=1`: `barrier.cluster`, distributed shared memory) need 9.0.
fn check_compute_capability(module: &super::ast::Module, gpu: &Gpu) -> Result<()> {
    let capability = super::capability_of(gpu.arch);
    let uses = |helper: &str| module.helpers.iter().any(|h| h.name == helper);
    for (helper, what, needed) in [
        (super::mma::MMA_HELPER, "tiled products on tensor cores (KILN_CUDA_TF32X3=1)", 80),
        (
            super::tile_staging::COPY_HELPER,
            "tiles whose slabs are copied asynchronously (KILN_CUDA_STAGES above 1)",
            80,
        ),
        (super::dependent_launch::HELPER, "programmatic dependent launch (KILN_CUDA_PDL=1)", 90),
        (super::cluster::SYNC_HELPER, "a sliced tile's slices as a thread block cluster (KILN_CUDA_CLUSTERS=1)", 90),
    ] {
        if capability < needed && uses(helper) {
            return Err(Error::Invalid(format!(
                "{what} needs a GPU of compute capability {}.{} or newer; {} is {}",
                needed / 10,
                needed % 10,
                gpu.name,
                gpu.arch
            )));
        }
    }
    Ok(())
}

/// Launches `f` with the attribute that lets it start before the kernel ahead of it on `stream`
/// has finished (programmatic stream serialization).
///
/// # Safety
/// As `cuLaunchKernel`: `params` holds one pointer to each of the kernel's arguments.
unsafe fn launch_dependent(
    f: &CudaFunction,
    grid: (u32, u32),
    block: (u32, u32),
    shared: u32,
    stream: &CudaStream,
    params: &mut [*mut std::ffi::c_void],
) -> Result<()> {
    let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: 1,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: 1,
        sharedMemBytes: shared,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
        .result()
        .map_err(cuda_err("launching a kernel (programmatic dependent launch)"))
}

pub(super) fn bytes_of(kp: &KernelProgram, b: usize) -> usize {
    kp.buffers[b].len * elem_size(kp.buffers[b].dtype) as usize
}

impl Plan {
    fn build(gpu: &Arc<Gpu>, program: &Program, shapes: &[Vec<usize>], streams: Option<usize>) -> Result<Plan> {
        let (kp, updates, out_shapes) = super::specialize_program(program, shapes)?;
        let (streams, memory) = super::streams_and_memory(&kp, streams);
        let dp = super::with_target_arch(gpu.arch, || emit(&kp, &memory))?;
        let source = super::print::program(&dp.module, &dp.steps);
        check_compute_capability(&dp.module, gpu)?;
        let dependent_launch = super::dependent_launch::uses(&dp.module);
        let t = std::time::Instant::now();
        let (parts, origin) = nvrtc::compile_module(&dp.module, gpu.arch)?;
        let nvrtc_seconds = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        gpu.bind()?;
        let mut functions: HashMap<String, CudaFunction> = HashMap::new();
        let shared_bytes: HashMap<&str, u32> =
            dp.module.kernels.iter().map(|k| (k.name.as_str(), k.dynamic_shared_bytes() as u32)).collect();
        let mut modules = Vec::with_capacity(parts.len());
        for part in parts {
            let module = gpu
                .ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(part.image))
                .map_err(cuda_err("loading the compiled module"))?;
            for k in part.kernels {
                let name = &dp.module.kernels[k].name;
                let f = module.load_function(name).map_err(cuda_err("finding a kernel"))?;
                let shared = shared_bytes[name.as_str()];
                if shared > 0 {
                    // A kernel past 48 KiB of shared memory must be allowed it before it launches.
                    let attribute = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                    f.set_attribute(attribute, shared as i32)
                        .map_err(cuda_err("allowing a kernel its dynamic shared memory"))?;
                }
                functions.insert(name.clone(), f);
            }
            modules.push(module);
        }
        let load_seconds = t.elapsed().as_secs_f64();
        let mut step_names: Vec<String> = dp
            .steps
            .iter()
            .map(|s| match s {
                DeviceStep::Launch(l) => l.kernel.clone(),
                DeviceStep::Gemm(mm) => mm.name.clone(),
                DeviceStep::GemmLt(g) => g.mm.name.clone(),
            })
            .collect();
        let mut steps: Vec<Exec> = dp
            .steps
            .iter()
            .map(|s| match s {
                DeviceStep::Launch(l) => Ok(Exec::Launch {
                    f: functions[&l.kernel].clone(),
                    args: l.args.clone(),
                    grid: l.launch.grid,
                    block: l.launch.block,
                    shared: shared_bytes[l.kernel.as_str()],
                }),
                DeviceStep::Gemm(mm) => Ok(Exec::Gemm(mm.clone())),
                DeviceStep::GemmLt(g) => Ok(Exec::GemmLt(g.clone(), super::lt_runtime::LtProduct::new(gpu, g)?)),
            })
            .collect::<Result<_>>()?;
        let mut code = String::new();
        for u in &updates {
            let (s, how) = match u {
                UpdateWrite::InPlace { shared } => (*shared, "written in place"),
                UpdateWrite::CopyAtEnd { shared, from } => {
                    steps.push(Exec::Copy { from: *from, shared: *shared, bytes: bytes_of(&kp, *from) });
                    step_names.push("update".into());
                    (*shared, "copied in after the last step")
                }
            };
            let name = program.graph.node(program.shared[s]).op.label();
            code.push_str(&format!("// update of shared variable '{name}': {how}\n"));
        }
        code.push_str(&source);
        let schedule = super::schedule::schedule(&dp.deps, streams);
        let lanes = gpu.lane_streams(schedule.streams)?;
        let event = || gpu.ctx.new_event(None).map_err(cuda_err("creating an event"));
        let sync = LaneSync {
            fork: if schedule.streams > 1 { Some(event()?) } else { None },
            after: schedule
                .recorded
                .iter()
                .map(|&r| if r { event().map(Some) } else { Ok(None) })
                .collect::<Result<_>>()?,
            joins: (1..schedule.streams).map(|_| event()).collect::<Result<_>>()?,
        };
        let returned = program.returned();
        let outputs: Vec<usize> = returned.iter().map(|&o| kp.outputs[o]).collect();
        let shapes = returned.iter().map(|&o| out_shapes[o].clone()).collect();
        let readback = Readback::new(gpu, &kp, &memory, &outputs, shapes, !dp.errors.is_empty())?;
        let slots = (0..memory.slot_bytes.len())
            .map(|s| match readback.slot_ptr(s) {
                Some(_) => Ok(None),
                None => DeviceBuffer::new(gpu, memory.slot_bytes[s]).map(Some),
            })
            .collect::<Result<Vec<_>>>()?;
        let slot_ptr: Vec<u64> = slots
            .iter()
            .enumerate()
            .map(|(s, own)| own.as_ref().map_or_else(|| readback.slot_ptr(s).unwrap_or(0), |b| b.ptr))
            .collect();
        for (b, buf) in kp.buffers.iter().enumerate() {
            if let (BufKind::Constant(t), Some(sl)) = (&buf.kind, memory.slot[b]) {
                let std = kiln_ir::map_array!(t, a => a.as_standard_layout().into_owned());
                let slot = slots[sl].as_ref().expect("a constant's slot is never in the egress");
                slot.upload(&tensor_bytes(&std))?;
            }
        }
        let mut inputs: Vec<Option<DeviceBuffer>> = (0..program.inputs.len()).map(|_| None).collect();
        for (b, buf) in kp.buffers.iter().enumerate() {
            if let BufKind::Input(k) = buf.kind {
                inputs[k] = Some(DeviceBuffer::new(gpu, bytes_of(&kp, b))?);
            }
        }
        let shared_buffer =
            (0..program.shared.len()).map(|k| kp.buffers.iter().position(|b| b.kind == BufKind::Shared(k))).collect();
        let scratch = dp
            .scratch
            .iter()
            .map(|&bytes| {
                let b = DeviceBuffer::new(gpu, bytes)?;
                b.upload(&vec![0u8; bytes])?;
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan {
            kp,
            schedule,
            lanes,
            sync,
            updates,
            steps,
            step_names,
            _slots: slots,
            slot_ptr,
            slot: memory.slot,
            inputs,
            errors: dp.errors,
            readback,
            shared_buffer,
            scratch,
            graph: None,
            calls: 0,
            code,
            stats: CompileStats { nvrtc_seconds, origin, load_seconds },
            dependent_launch,
            _modules: modules,
        })
    }

    /// A label per step, for profiles.
    fn step_labels(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| match s {
                Exec::Launch { grid, block, .. } => format!("kernel grid {grid:?} block {block:?}"),
                Exec::Gemm(mm) => format!(
                    "cuBLAS {} {}x{}x{}{}{}{}",
                    mm.name,
                    mm.m,
                    mm.k,
                    mm.n,
                    if mm.batch > 1 { format!(" x{}", mm.batch) } else { String::new() },
                    if mm.a_transposed { " A^T" } else { "" },
                    if mm.b_transposed { " B^T" } else { "" }
                ),
                Exec::GemmLt(g, product) => format!("{} {} ({})", g.mm.name, g.describe(), product.choice),
                Exec::Copy { bytes, .. } => format!("copy {bytes} bytes"),
            })
            .collect()
    }

    /// Makes the main stream wait for everything enqueued so far on the other lanes.
    fn join_lanes(&self) -> Result<()> {
        let lanes = &self.lanes;
        for (lane, joined) in lanes[1..].iter().zip(&self.sync.joins) {
            joined.record(lane).map_err(cuda_err("recording an event"))?;
            lanes[0].wait(joined).map_err(cuda_err("waiting for an event"))?;
        }
        Ok(())
    }

    /// Enqueues every step (also while capturing): each on its lane's stream, after waiting for
    /// the steps on other lanes it depends on (`schedule`); the other lanes start after the main
    /// stream's start and end joined into it, before the update copies. With `events` (one lane),
    /// records `events[i]` before step `i` and the last one after the last step.
    fn enqueue(&self, gpu: &Gpu, ptr: &[u64], shared_ptr: &[u64], events: Option<&[CudaEvent]>) -> Result<()> {
        let lanes = &self.lanes;
        let main = &lanes[0];
        let error_ptr = self.readback.error_ptr();
        if self.readback.clears_in_step() {
            // SAFETY: the error word's 4 bytes (`KILN_CUDA_EGRESS=0`: cleared inside the step).
            unsafe { result::memset_d8_async(error_ptr, 0xff, 4, main.cu_stream()) }
                .map_err(cuda_err("clearing the error word"))?;
        }
        let record = |e: &CudaEvent, s: &CudaStream| e.record(s).map_err(cuda_err("recording an event"));
        let wait = |s: &CudaStream, e: &CudaEvent| s.wait(e).map_err(cuda_err("waiting for an event"));
        if let Some(fork) = &self.sync.fork {
            record(fork, main)?;
            for lane in &lanes[1..] {
                wait(lane, fork)?;
            }
        }
        let device_steps = self.schedule.stream.len();
        // The device steps in the schedule's order, then the update copies on the main stream once
        // every lane has joined it (the read-backs come after them).
        let order = self.schedule.order.iter().copied().chain(device_steps..self.steps.len());
        for i in order {
            if let Some(ev) = events {
                record(&ev[i], main)?;
            }
            if i == device_steps {
                self.join_lanes()?;
            }
            let lane = if i < device_steps { self.schedule.stream[i] } else { 0 };
            let stream = &lanes[lane];
            if i < device_steps {
                for &w in &self.schedule.waits[i] {
                    wait(stream, self.sync.after[w].as_ref().expect("an event after every waited-for step"))?;
                }
            }
            match &self.steps[i] {
                Exec::Launch { f, args, grid, block, shared } if grid.0 > 0 => {
                    let mut values: Vec<u64> = args
                        .iter()
                        .map(|a| match a {
                            KernelArg::Buf(b) => ptr[*b],
                            KernelArg::ErrorFlag => error_ptr,
                            KernelArg::Scratch(k) => self.scratch[*k].ptr,
                        })
                        .collect();
                    let mut params: Vec<*mut std::ffi::c_void> =
                        values.iter_mut().map(|v| v as *mut u64 as *mut std::ffi::c_void).collect();
                    if self.dependent_launch {
                        // SAFETY: as below; the kernel waits for the grids ahead of it before it
                        // touches memory (`dependent_launch`).
                        unsafe { launch_dependent(f, *grid, *block, *shared, stream, &mut params)? };
                    } else {
                        // SAFETY: the kernel takes one pointer per argument, each a device buffer
                        // at least as long as every index the kernel can form (checked by the
                        // lowering).
                        unsafe {
                            result::launch_kernel(
                                f.cu_function(),
                                (grid.0, grid.1, 1),
                                (block.0, block.1, 1),
                                *shared,
                                stream.cu_stream(),
                                &mut params,
                            )
                        }
                        .map_err(cuda_err("launching a kernel"))?;
                    }
                }
                Exec::Launch { .. } => {}
                // SAFETY: operand sizes were checked by the lowering.
                Exec::Gemm(mm) => unsafe { gpu.gemm(lane, mm, ptr[mm.a], ptr[mm.b], ptr[mm.c])? },
                // SAFETY: as above; a bias holds a float per column (`lt::product`).
                Exec::GemmLt(g, product) => unsafe {
                    let bias = g.epilogue.as_ref().map(|ep| ptr[ep.bias]);
                    product.run(gpu, lane, ptr[g.mm.a], ptr[g.mm.b], bias, ptr[g.mm.c])?
                },
                Exec::Copy { from, shared, bytes } => {
                    // SAFETY: both buffers hold `bytes` bytes (the update keeps the variable's type).
                    unsafe { result::memcpy_dtod_async(shared_ptr[*shared], ptr[*from], *bytes, stream.cu_stream()) }
                        .map_err(cuda_err("copying an update"))?;
                }
            }
            if let Some(e) = self.sync.after.get(i).and_then(|e| e.as_ref()) {
                record(e, stream)?;
            }
        }
        if device_steps == self.steps.len() {
            self.join_lanes()?;
        }
        if let Some(ev) = events {
            record(&ev[self.steps.len()], main)?;
        }
        Ok(())
    }
}

impl Drop for CudaExecutable {
    fn drop(&mut self) {
        // Graphs, modules and buffers are destroyed in this device's turn, never during another
        // thread's capture.
        if let Some(p) = &self.profile {
            eprint!("{}", p.steps.profile("CUDA"));
        }
        let gpu = self.gpu.clone();
        let _turn = gpu.turn();
        self.plans.clear();
    }
}

impl CudaExecutable {
    /// Compile statistics of the specialization for these shapes (after `prepare` or a call).
    pub fn stats(&self, shapes: &[Vec<usize>]) -> Option<CompileStats> {
        self.plans.get(shapes).map(|p| p.stats)
    }

    /// Makes each shared variable resident on this device and returns their device addresses.
    fn residents(&self, shared: &mut [SharedValue], plan: &Plan) -> Result<Vec<u64>> {
        let mut ptrs = Vec::with_capacity(shared.len());
        for (k, value) in shared.iter_mut().enumerate() {
            let (len, dtype) = (value.shape().iter().product::<usize>(), value.ty().dtype);
            if let Some(b) = plan.shared_buffer[k].map(|b| &plan.kp.buffers[b]) {
                if (len, dtype) != (b.len, b.dtype) {
                    return Err(Error::Invalid(format!(
                        "a value of {} was bound to a buffer of {} {}",
                        value.ty(),
                        b.len,
                        b.dtype
                    )));
                }
            }
            let (ordinal, bytes) = (self.gpu.ordinal, len * elem_size(dtype) as usize);
            let usable =
                value.resident_mut::<CudaResident>().is_some_and(|r| r.ordinal == ordinal && r.buf.bytes == bytes);
            if !usable {
                let buf = DeviceBuffer::new(&self.gpu, bytes)?;
                buf.upload(&tensor_bytes(value.host()?))?;
                value.set_resident(Box::new(CudaResident { buf, ordinal }));
            }
            ptrs.push(value.resident_mut::<CudaResident>().expect("just made resident").buf.ptr);
        }
        Ok(ptrs)
    }
}

impl Executable for CudaExecutable {
    fn run(&mut self, inputs: &[&Tensor], shared: &mut [SharedValue]) -> Result<Vec<Tensor>> {
        let key: Vec<Vec<usize>> =
            inputs.iter().map(|t| t.shape().to_vec()).chain(shared.iter().map(|s| s.shape().to_vec())).collect();
        let gpu = self.gpu.clone();
        let _turn = gpu.turn();
        self.prepare_in_turn(&key)?;
        gpu.bind()?;
        let plan = self.plans.get(&key).expect("prepared");
        // Indices that come from arguments are checked before anything runs.
        super::check_argument_indices(&plan.kp, inputs)?;
        let shared_ptr = self.residents(shared, plan)?;
        let plan = self.plans.get_mut(&key).expect("prepared");
        for (k, t) in inputs.iter().enumerate() {
            if let Some(buf) = &plan.inputs[k] {
                let need = buf.bytes;
                let bytes = tensor_bytes(t);
                if bytes.len() != need {
                    return Err(Error::Invalid(format!("input {k}: {} bytes for a buffer of {need}", bytes.len())));
                }
                buf.upload(&bytes)?;
            }
        }
        let ptr: Vec<u64> = plan
            .kp
            .buffers
            .iter()
            .enumerate()
            .map(|(b, buf)| match buf.kind {
                BufKind::Input(k) => plan.inputs[k].as_ref().map_or(0, |d| d.ptr),
                BufKind::Shared(k) => shared_ptr[k],
                _ => plan.slot[b].map_or(0, |s| plan.slot_ptr[s]),
            })
            .collect();
        plan.calls += 1;
        let graph_ok = plan.graph.as_ref().is_some_and(|(_, p)| *p == shared_ptr);
        if self.graphs && self.profile.is_none() && !graph_ok && plan.calls >= 2 {
            // Capture once the plan has run eagerly (which loads everything lazily initialized).
            plan.graph = None;
            let g = capture(&gpu, || plan.enqueue(&gpu, &ptr, &shared_ptr, None))?;
            plan.graph = Some((g, shared_ptr.clone()));
        }
        plan.readback.before_step(&plan.lanes[0])?;
        match (&plan.graph, &mut self.profile) {
            (_, Some(profile)) => {
                let n = plan.steps.len() + 1;
                while profile.events.len() < n {
                    let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
                    profile.events.push(gpu.ctx.new_event(timed).map_err(cuda_err("creating an event"))?);
                }
                plan.enqueue(&gpu, &ptr, &shared_ptr, Some(&profile.events))?;
                gpu.synchronize()?;
                for (i, label) in plan.step_labels().into_iter().enumerate() {
                    let ms =
                        profile.events[i].elapsed_ms(&profile.events[i + 1]).map_err(cuda_err("reading an event"))?;
                    profile.steps.add(&format!("{}: {label}", plan.step_names[i]), ms as f64 * 1e-3);
                }
            }
            (Some((g, _)), None) => g.launch().map_err(cuda_err("launching the step's CUDA graph"))?,
            (None, None) => plan.enqueue(&gpu, &ptr, &shared_ptr, None)?,
        }
        for u in &plan.updates {
            let s = match u {
                UpdateWrite::InPlace { shared } | UpdateWrite::CopyAtEnd { shared, .. } => *shared,
            };
            shared[s].mark_resident_newer();
        }
        let (outs, code) = plan.readback.read(&gpu, &ptr)?;
        super::check_error_word(&plan.errors, code)?;
        Ok(outs)
    }

    fn prepare(&mut self, key: &[Vec<usize>]) -> Result<()> {
        let gpu = self.gpu.clone();
        let _turn = gpu.turn();
        self.prepare_in_turn(key)
    }

    fn generated_code(&self) -> String {
        self.order.iter().map(|k| self.plans[k].code.as_str()).collect::<Vec<_>>().join("\n")
    }

    fn profile(&self) -> Option<crate::Profile> {
        self.profile.as_ref().map(|p| p.steps.profile("CUDA"))
    }

    fn compile_stats(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .order
            .iter()
            .map(|k| {
                let s = self.plans[k].stats;
                format!(
                    "{:?}: nvrtc {:.1} ms ({:?}), module load {:.1} ms",
                    k,
                    s.nvrtc_seconds * 1e3,
                    s.origin,
                    s.load_seconds * 1e3
                )
            })
            .collect();
        lines.push(priorities(&self.gpu));
        lines
    }
}

impl CudaExecutable {
    fn prepare_in_turn(&mut self, key: &[Vec<usize>]) -> Result<()> {
        if !self.plans.contains_key(key) {
            let plan =
                super::with_compile_options(&self.opts, || Plan::build(&self.gpu, &self.program, key, self.streams))?;
            self.plans.insert(key.to_vec(), plan);
            self.order.push(key.to_vec());
        }
        Ok(())
    }
}
