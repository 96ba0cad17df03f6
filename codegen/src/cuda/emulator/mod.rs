//! The CUDA emulator: runs the CUDA backend's generated program on the CPU, so that its kernels are
//! checked against the reference on every machine, not only where a GPU is lent. The program is
//! the one `Device::Cuda` would run (same specialization, lowering, memory plan, kernels, launch
//! shapes and step list); its CUDA C, exactly as printed for NVRTC, is compiled as C++ against a
//! shim of CUDA's built-ins (`shim.h`: blocks in reverse order, threads as fibers where a kernel
//! waits on its block or warp) and called step by step, in an order as far from the program's as
//! the steps' dependencies allow (so a dependency the scheduler missed shows). cuBLAS products run
//! on the host with the same operand layout. Every buffer is framed by guard bytes that are checked
//! after each step, so a kernel that writes outside its buffers is an error naming it, not silent
//! corruption. Kernels are compiled with the compiler's undefined-behaviour checks (misaligned
//! `float4` access, which a CPU forgives and a GPU faults on; shared-array indices out of bounds,
//! which no guard byte sees; signed index overflow; bad shifts), reported as an error naming the
//! kernel and the line of the printed module; so is a block barrier that not every thread of the
//! block reaches (a hang on a GPU), or a warp shuffle that a lane of the warp skips.
//! `with_mirrored_schedule` runs blocks and threads in the other order, so a race one order hides
//! shows; `with_race_check` (or `KILN_EMU_RACECHECK=1`) checks every load and store against CUDA's
//! ordering rules instead, whatever the order: barriers within a block, and between the blocks of
//! a launch only the last-block protocol (fence, ticket, L2 load) or, within a thread block
//! cluster, a read of another block's shared memory after a cluster barrier (a cluster's blocks
//! run each on an OS thread of its own, one at a time, passing at cluster barriers). What it cannot check: timing,
//! the PTX NVRTC makes of the source (NVRTC compiles the same text in CI), what the hardware does
//! with a protocol the rules accept (the race check takes the CUDA memory model's word for it),
//! and CUDA's own math library's rounding.

mod build;
mod step_races;
pub use build::unavailable_reason;

use super::ast::Module;
use super::emit::{emit, DeviceStep, ErrorSite, KernelArg};
use super::lt::LtGemm;
use crate::bytes::{tensor_bytes, tensor_from_bytes};
use crate::kernel::{elem_size, BufKind, KernelProgram, MatMul, UpdateWrite};
use crate::{with_host_values, Backend, CompileOptions, Executable, Program, SharedValue};
use kiln_ir::{DType, Error, Result, Tensor};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// Runs the CUDA backend's program on the CPU (see the module docs).
pub struct CudaEmulator;

impl Backend for CudaEmulator {
    fn name(&self) -> &'static str {
        "cuda-emulator"
    }
    fn compile(&self, program: &Program, opts: &CompileOptions) -> Result<Box<dyn Executable>> {
        if let Some(why) = unavailable_reason() {
            return Err(Error::Invalid(format!("Device::CudaEmulator is not available: {why}")));
        }
        Ok(Box::new(EmulatedExecutable {
            program: program.clone(),
            opts: opts.clone(),
            plans: HashMap::new(),
            order: vec![],
        }))
    }
}

/// Bytes of guard on each side of every buffer (also keeps 16-byte alignment for float4 access).
const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0xa5;

/// Host memory standing for a device buffer, framed by guard bytes.
struct HostBuffer {
    words: Vec<u128>,
    bytes: usize,
}

impl HostBuffer {
    fn new(bytes: usize) -> HostBuffer {
        let mut b = HostBuffer { words: vec![0; (2 * GUARD + bytes).div_ceil(16)], bytes };
        let all = b.all_mut();
        let end = all.len();
        all[..GUARD].fill(GUARD_BYTE);
        all[GUARD + bytes..end].fill(GUARD_BYTE);
        b
    }
    fn all_mut(&mut self) -> &mut [u8] {
        let n = self.words.len() * 16;
        // SAFETY: the words are plain memory of n bytes.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, n) }
    }
    fn all(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.words.len() * 16) }
    }
    fn data(&self) -> &[u8] {
        &self.all()[GUARD..GUARD + self.bytes]
    }
    fn write(&mut self, bytes: &[u8]) {
        let n = self.bytes;
        self.all_mut()[GUARD..GUARD + n].copy_from_slice(bytes);
    }
    fn ptr(&mut self) -> *mut c_void {
        // SAFETY: GUARD is inside the allocation.
        unsafe { (self.words.as_mut_ptr() as *mut u8).add(GUARD) as *mut c_void }
    }
    fn guards_intact(&self) -> bool {
        let all = self.all();
        all[..GUARD].iter().chain(&all[GUARD + self.bytes..]).all(|&b| b == GUARD_BYTE)
    }
}

/// A kernel's entry point (`build::entry_point`): null, or the first fault its launch ran into
/// (undefined behaviour, or a barrier that not every thread of a block reached; a C string, valid
/// until the next launch on this thread).
type EntryPoint = unsafe extern "C" fn(*mut *mut c_void, u32, u32, u32, u32, i32) -> *const std::ffi::c_char;

thread_local! {
    static MIRRORED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static RACE_CHECK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every kernel this thread emulates on the mirrored schedule: blocks first to last
/// and each block's threads last to first, where the usual schedule runs blocks last to first and
/// threads first to last. Any order is one a GPU may take; a race between threads (a read of what
/// another thread wrote with no barrier between) or between blocks that one order hides, the other
/// shows, so the CUDA tests run the emulator both ways.
pub fn with_mirrored_schedule<R>(f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&MIRRORED, true, f)
}

/// Runs `f` with every kernel this thread emulates under the race check: each load and store of
/// the kernel is checked against CUDA's ordering rules, not against the order the emulator happens
/// to run threads and blocks in (see the shim): a conflicting access by two threads of a block
/// with no `__syncthreads` between, an access to what another block of the same launch wrote (other
/// than the last-block protocol: published by `__threadfence`, read from L2 after a ticket), or two
/// blocks writing one element, is an error naming the kernel, the buffer or shared array, the
/// element and both threads. Several times slower; `KILN_EMU_RACECHECK=1` turns it on everywhere.
pub fn with_race_check<R>(f: impl FnOnce() -> R) -> R {
    super::with_thread_setting(&RACE_CHECK, true, f)
}

fn race_check_on() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    RACE_CHECK.with(|r| r.get()) || crate::cuda::switch_from_env(&FROM_ENV, "KILN_EMU_RACECHECK", "1")
}

/// The race check's registration of a launch's buffers (`kiln_emu_race_buffers` in the shim):
/// count, names, addresses, sizes in bytes, element sizes.
type RaceBuffers =
    unsafe extern "C" fn(u32, *const *const std::ffi::c_char, *const *mut c_void, *const usize, *const u32);

/// What the race check is told of a launch's arguments, in the shim's layout: the kernel's name
/// for each, its bytes and its element size.
struct RaceArgs {
    names: Vec<std::ffi::CString>,
    bytes: Vec<usize>,
    element_bytes: Vec<u32>,
}

/// A compiled form of the plan's module: its library, each step's entry point, and in
/// race-checked form the check's registration of buffers and report of what a launch touched.
struct Compiled {
    entries: Vec<Option<EntryPoint>>,
    race: Option<(RaceBuffers, step_races::RaceRuns)>,
    _lib: Arc<libloading::Library>,
}

impl Compiled {
    fn new(module: &Module, source: &str, steps: &[DeviceStep], race_check: bool) -> Result<Compiled> {
        let lib = build::library(&build::unit(module, source, race_check))?;
        let mut entries = Vec::with_capacity(steps.len());
        for s in steps {
            entries.push(match s {
                DeviceStep::Launch(l) => {
                    let symbol = format!("kiln_emu_{}", l.kernel);
                    // SAFETY: every kernel has an entry point of this signature (build::entry_point).
                    let f = unsafe { lib.get::<EntryPoint>(symbol.as_bytes()) }
                        .map_err(|e| Error::Invalid(format!("emulated kernel {}: {e}", l.kernel)))?;
                    Some(*f)
                }
                DeviceStep::Gemm(_) | DeviceStep::GemmLt(_) => None,
            });
        }
        let race = if race_check {
            let missing = |e: libloading::Error| Error::Invalid(format!("the emulator's race check: {e}"));
            // SAFETY: the shim defines both with these signatures in race-checked units.
            unsafe {
                let buffers = lib.get::<RaceBuffers>(b"kiln_emu_race_buffers").map_err(missing)?;
                let runs = lib.get::<step_races::RaceRuns>(b"kiln_emu_race_runs").map_err(missing)?;
                Some((*buffers, *runs))
            }
        } else {
            None
        };
        Ok(Compiled { entries, race, _lib: lib })
    }
}

/// The entry point's report as an error naming the kernel.
fn fault(kernel: &str, report: *const std::ffi::c_char) -> Result<()> {
    if report.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null report is the shim's NUL-terminated buffer, untouched until the next launch.
    let what = unsafe { std::ffi::CStr::from_ptr(report) }.to_string_lossy();
    Err(Error::Invalid(format!("emulated kernel {kernel}: {what}")))
}

enum Exec {
    Launch {
        kernel: String,
        args: Vec<KernelArg>,
        /// What the race check is told of the arguments.
        race_buffers: RaceArgs,
        grid: (u32, u32),
        block: (u32, u32),
    },
    Gemm(MatMul),
    GemmLt(LtGemm),
    /// An update that could not be written in place, copied into the variable after the last step.
    Copy {
        from: usize,
        shared: usize,
    },
}

struct Plan {
    kp: KernelProgram,
    /// The order the steps run in: the device program's in the latest-ready-first order its
    /// dependencies allow (see `schedule`), then the update copies.
    order: Vec<usize>,
    updates: Vec<UpdateWrite>,
    returned: Vec<usize>,
    out_shapes: Vec<Vec<usize>>,
    steps: Vec<Exec>,
    slots: Vec<HostBuffer>,
    slot: Vec<Option<usize>>,
    inputs: Vec<Option<HostBuffer>>,
    errors: Vec<ErrorSite>,
    error_word: HostBuffer,
    scratch: Vec<HostBuffer>,
    code: String,
    module: Module,
    device_steps: Vec<DeviceStep>,
    /// The device steps' dependencies (what the race check between steps holds them to), and
    /// the steps' names in its reports.
    deps: Vec<Vec<usize>>,
    step_names: Vec<String>,
    /// The module compiled as is, and (once asked for) compiled for the race check.
    compiled: Compiled,
    race_checked: Option<Compiled>,
}

pub struct EmulatedExecutable {
    program: Program,
    /// What the compile fixed for every specialization (an autotune's setting).
    opts: CompileOptions,
    plans: HashMap<Vec<Vec<usize>>, Plan>,
    order: Vec<Vec<Vec<usize>>>,
}

fn bytes_of(kp: &KernelProgram, b: usize) -> usize {
    kp.buffers[b].len * elem_size(kp.buffers[b].dtype) as usize
}

impl Plan {
    fn build(program: &Program, shapes: &[Vec<usize>]) -> Result<Plan> {
        let (kp, updates, out_shapes) = super::specialize_program(program, shapes)?;
        let (_, memory) = crate::cuda::streams_and_memory(&kp, crate::cuda::streams_requested()?);
        let dp = emit(&kp, &memory)?;
        let source = super::print::program(&dp.module, &dp.steps);
        let compiled = Compiled::new(&dp.module, &source, &dp.steps, false)?;
        let mut steps = Vec::with_capacity(dp.steps.len());
        for s in &dp.steps {
            steps.push(match s {
                DeviceStep::Launch(l) => {
                    let params = dp.module.kernels.iter().find(|k| k.name == l.kernel).map(|k| &k.params);
                    let params = params.filter(|p| p.len() == l.args.len()).ok_or_else(|| {
                        Error::Invalid(format!("emulated kernel {}: its parameters and arguments differ", l.kernel))
                    })?;
                    let race_buffers = RaceArgs {
                        names: params
                            .iter()
                            .map(|p| std::ffi::CString::new(p.name.as_str()).unwrap_or_default())
                            .collect(),
                        bytes: l
                            .args
                            .iter()
                            .map(|a| match a {
                                KernelArg::Buf(b) => bytes_of(&kp, *b),
                                KernelArg::ErrorFlag => 4,
                                KernelArg::Scratch(k) => dp.scratch[*k],
                            })
                            .collect(),
                        element_bytes: params.iter().map(|p| p.ty.size() as u32).collect(),
                    };
                    Exec::Launch {
                        kernel: l.kernel.clone(),
                        args: l.args.clone(),
                        race_buffers,
                        grid: l.launch.grid,
                        block: l.launch.block,
                    }
                }
                DeviceStep::Gemm(mm) => Exec::Gemm(mm.clone()),
                DeviceStep::GemmLt(g) => Exec::GemmLt(g.clone()),
            });
        }
        let mut order = super::schedule::latest_first_order(&dp.deps);
        for u in &updates {
            if let UpdateWrite::CopyAtEnd { shared, from } = u {
                order.push(steps.len());
                steps.push(Exec::Copy { from: *from, shared: *shared });
            }
        }
        let mut slots: Vec<HostBuffer> = memory.slot_bytes.iter().map(|&n| HostBuffer::new(n)).collect();
        for (b, buf) in kp.buffers.iter().enumerate() {
            if let (BufKind::Constant(t), Some(sl)) = (&buf.kind, memory.slot[b]) {
                let std = kiln_ir::map_array!(t, a => a.as_standard_layout().into_owned());
                let bytes = tensor_bytes(&std);
                slots[sl].all_mut()[GUARD..GUARD + bytes.len()].copy_from_slice(&bytes);
            }
        }
        let mut inputs: Vec<Option<HostBuffer>> = (0..program.inputs.len()).map(|_| None).collect();
        for (b, buf) in kp.buffers.iter().enumerate() {
            if let BufKind::Input(k) = buf.kind {
                inputs[k] = Some(HostBuffer::new(bytes_of(&kp, b)));
            }
        }
        Ok(Plan {
            returned: program.returned(),
            kp,
            order,
            updates,
            out_shapes,
            steps,
            slots,
            slot: memory.slot,
            inputs,
            errors: dp.errors,
            error_word: HostBuffer::new(4),
            scratch: dp.scratch.iter().map(|&n| HostBuffer::new(n)).collect(),
            code: source,
            module: dp.module,
            step_names: dp
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    DeviceStep::Launch(l) => l.kernel.clone(),
                    DeviceStep::Gemm(_) => format!("cuBLAS product (step {i})"),
                    DeviceStep::GemmLt(_) => format!("cuBLASLt product (step {i})"),
                })
                .collect(),
            device_steps: dp.steps,
            deps: dp.deps,
            compiled,
            race_checked: None,
        })
    }

    /// Where each buffer of the program lives this call.
    fn pointers(&mut self, shared: &mut [HostBuffer]) -> Vec<*mut c_void> {
        let kp = &self.kp;
        let (inputs, slots, slot) = (&mut self.inputs, &mut self.slots, &self.slot);
        (0..kp.buffers.len())
            .map(|b| match kp.buffers[b].kind {
                BufKind::Input(k) => inputs[k].as_mut().map_or(std::ptr::null_mut(), |h| h.ptr()),
                BufKind::Shared(k) => shared[k].ptr(),
                _ => slot[b].map_or(std::ptr::null_mut(), |s| slots[s].ptr()),
            })
            .collect()
    }

    fn guards_intact(&self, shared: &[HostBuffer]) -> bool {
        self.slots
            .iter()
            .chain(self.inputs.iter().flatten())
            .chain(shared)
            .chain(&self.scratch)
            .all(|h| h.guards_intact())
            && self.error_word.guards_intact()
    }

    fn execute(&mut self, shared: &mut [HostBuffer]) -> Result<()> {
        let race_check = race_check_on();
        if race_check && self.race_checked.is_none() {
            self.race_checked = Some(Compiled::new(&self.module, &self.code, &self.device_steps, true)?);
        }
        let ptr = self.pointers(shared);
        self.error_word.write(&super::NO_ERROR.to_ne_bytes());
        let error_ptr = self.error_word.ptr();
        let scratch: Vec<*mut c_void> = self.scratch.iter_mut().map(|h| h.ptr()).collect();
        let compiled = if race_check { self.race_checked.as_ref().expect("compiled above") } else { &self.compiled };
        // What each device step touched, for the race check between steps.
        let mut touched: Vec<Vec<step_races::Touch>> = vec![vec![]; self.device_steps.len()];
        for &i in &self.order {
            match &self.steps[i] {
                Exec::Launch { kernel, args, race_buffers, grid, block } => {
                    if grid.0 == 0 {
                        continue;
                    }
                    let f = compiled.entries[i].expect("a launch has an entry point");
                    let mut values: Vec<*mut c_void> = args
                        .iter()
                        .map(|a| match a {
                            KernelArg::Buf(b) => ptr[*b],
                            KernelArg::ErrorFlag => error_ptr,
                            KernelArg::Scratch(k) => scratch[*k],
                        })
                        .collect();
                    if let Some((register, _)) = compiled.race {
                        let names: Vec<*const std::ffi::c_char> =
                            race_buffers.names.iter().map(|n| n.as_ptr()).collect();
                        // SAFETY: four arrays of the launch's argument count (checked when the plan
                        // was built), the names NUL-terminated and alive for the call; the shim
                        // copies what it keeps.
                        unsafe {
                            register(
                                values.len() as u32,
                                names.as_ptr(),
                                values.as_ptr(),
                                race_buffers.bytes.as_ptr(),
                                race_buffers.element_bytes.as_ptr(),
                            )
                        };
                    }
                    // SAFETY: the entry point takes one pointer per kernel parameter; what the
                    // kernel does with them is what this emulator checks (guards below).
                    let mirrored = MIRRORED.with(|m| m.get()) as i32;
                    let report = unsafe { f(values.as_mut_ptr(), grid.0, grid.1, block.0, block.1, mirrored) };
                    fault(kernel, report)?;
                    if !self.guards_intact(shared) {
                        return Err(Error::Invalid(format!("emulated kernel {kernel} wrote outside its buffers")));
                    }
                    if let Some((_, runs)) = compiled.race {
                        for (k, name) in race_buffers.names.iter().enumerate() {
                            if !values[..k].contains(&values[k]) {
                                step_races::launch_touched(runs, values[k], &name.to_string_lossy(), &mut touched[i]);
                            }
                        }
                    }
                }
                Exec::Gemm(mm) => {
                    // SAFETY: the lowering checked the operand sizes against the product.
                    unsafe { host_gemm(mm, ptr[mm.a], ptr[mm.b], ptr[mm.c])? };
                    if compiled.race.is_some() {
                        let operands = [(mm.a, "a", false), (mm.b, "b", false), (mm.c, "c", true)];
                        touched[i] = product_touches(&self.kp, &ptr, &operands);
                    }
                }
                Exec::GemmLt(g) => {
                    let mm = &g.mm;
                    // SAFETY: the lowering checked the operand sizes against the product, and the
                    // bias holds a float for each of its columns (`lt::product`).
                    unsafe {
                        host_gemm(mm, ptr[mm.a], ptr[mm.b], ptr[mm.c])?;
                        if let Some(ep) = &g.epilogue {
                            let c = std::slice::from_raw_parts_mut(ptr[mm.c] as *mut f32, mm.m * mm.n);
                            let bias = std::slice::from_raw_parts(ptr[ep.bias] as *const f32, mm.n);
                            host_bias_epilogue(c, bias, ep.relu);
                        }
                    }
                    if compiled.race.is_some() {
                        let mut operands = vec![(mm.a, "a", false), (mm.b, "b", false), (mm.c, "c", true)];
                        operands.extend(g.epilogue.as_ref().map(|ep| (ep.bias, "bias", false)));
                        touched[i] = product_touches(&self.kp, &ptr, &operands);
                    }
                }
                Exec::Copy { from, shared: s } => {
                    let n = bytes_of(&self.kp, *from);
                    // SAFETY: both buffers hold n bytes (an update keeps its variable's type).
                    unsafe { std::ptr::copy_nonoverlapping(ptr[*from] as *const u8, shared[*s].ptr() as *mut u8, n) };
                }
            }
        }
        if compiled.race.is_some() {
            step_races::check(&self.deps, &self.step_names, &touched)?;
        }
        Ok(())
    }
}

/// What a product step touched, for the race check: each operand's whole buffer.
fn product_touches(
    kp: &KernelProgram,
    ptr: &[*mut c_void],
    operands: &[(usize, &str, bool)],
) -> Vec<step_races::Touch> {
    operands
        .iter()
        .map(|&(b, name, write)| {
            let lo = ptr[b] as usize;
            step_races::Touch { lo, hi: lo + bytes_of(kp, b), write, buffer: name.into() }
        })
        .collect()
}

/// cuBLASLt's bias epilogue on the host: `c + bias` along each row, then the ReLU where asked, as
/// kiln's epilogue kernel computes them.
fn host_bias_epilogue(c: &mut [f32], bias: &[f32], relu: bool) {
    for row in c.chunks_mut(bias.len()) {
        for (x, b) in row.iter_mut().zip(bias) {
            let y = *x + b;
            *x = if relu && y < 0.0 { 0.0 } else { y };
        }
    }
}

type Gemm<T> =
    unsafe fn(usize, usize, usize, T, *const T, isize, isize, *const T, isize, isize, T, *mut T, isize, isize);

/// A cuBLAS product's semantics on the host (`C = A B`, row-major, per batch item).
unsafe fn host_gemm(mm: &MatMul, a: *mut c_void, b: *mut c_void, c: *mut c_void) -> Result<()> {
    match mm.dtype {
        DType::F32 => batched(mm, a as *const f32, b as *const f32, c as *mut f32, matrixmultiply::sgemm, 1.0, 0.0),
        DType::F64 => batched(mm, a as *const f64, b as *const f64, c as *mut f64, matrixmultiply::dgemm, 1.0, 0.0),
        d => return Err(Error::Invalid(format!("cuBLAS product of {d}"))),
    }
    Ok(())
}

unsafe fn batched<T: Copy>(mm: &MatMul, a: *const T, b: *const T, c: *mut T, gemm: Gemm<T>, one: T, zero: T) {
    let (m, k, n) = (mm.m, mm.k, mm.n);
    // Element strides (row, column) of A as [m, k] and B as [k, n].
    let (rsa, csa) = if mm.a_transposed { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if mm.b_transposed { (1, k as isize) } else { (n as isize, 1) };
    for i in 0..mm.batch {
        let (a, b, c) = (a.add(i * mm.a_batch_stride), b.add(i * mm.b_batch_stride), c.add(i * m * n));
        gemm(m, k, n, one, a, rsa, csa, b, rsb, csb, zero, c, n as isize, 1);
    }
}

impl Executable for EmulatedExecutable {
    fn run(&mut self, inputs: &[&Tensor], shared: &mut [SharedValue]) -> Result<Vec<Tensor>> {
        let key: Vec<Vec<usize>> =
            inputs.iter().map(|t| t.shape().to_vec()).chain(shared.iter().map(|s| s.shape().to_vec())).collect();
        self.prepare(&key)?;
        let plan = self.plans.get_mut(&key).expect("prepared");
        super::check_argument_indices(&plan.kp, inputs)?;
        for (k, t) in inputs.iter().enumerate() {
            if let Some(buf) = &mut plan.inputs[k] {
                let bytes = tensor_bytes(t);
                if bytes.len() != buf.bytes {
                    return Err(Error::Invalid(format!(
                        "input {k}: {} bytes for a buffer of {}",
                        bytes.len(),
                        buf.bytes
                    )));
                }
                buf.write(&bytes);
            }
        }
        with_host_values(shared, |values| {
            let mut memory: Vec<HostBuffer> = values
                .iter()
                .map(|v| {
                    let bytes = tensor_bytes(v);
                    let mut h = HostBuffer::new(bytes.len());
                    h.write(&bytes);
                    h
                })
                .collect();
            plan.execute(&mut memory)?;
            let word = plan.error_word.data();
            super::check_error_word(&plan.errors, u32::from_ne_bytes([word[0], word[1], word[2], word[3]]))?;
            let outs = plan
                .returned
                .iter()
                .map(|&o| {
                    let b = plan.kp.outputs[o];
                    let bytes = match plan.kp.buffers[b].kind {
                        BufKind::Input(k) => plan.inputs[k].as_ref().map_or(&[][..], |h| h.data()),
                        BufKind::Shared(k) => memory[k].data(),
                        _ => plan.slot[b].map_or(&[][..], |s| plan.slots[s].data()),
                    };
                    tensor_from_bytes(plan.kp.buffers[b].dtype, &plan.out_shapes[o], &bytes[..bytes_of(&plan.kp, b)])
                })
                .collect();
            for u in &plan.updates {
                let s = match u {
                    UpdateWrite::InPlace { shared } | UpdateWrite::CopyAtEnd { shared, .. } => *shared,
                };
                values[s] = tensor_from_bytes(values[s].dtype(), values[s].shape(), memory[s].data());
            }
            Ok(outs)
        })
    }

    fn prepare(&mut self, key: &[Vec<usize>]) -> Result<()> {
        if !self.plans.contains_key(key) {
            let plan = super::with_compile_options(&self.opts, || Plan::build(&self.program, key))?;
            self.plans.insert(key.to_vec(), plan);
            self.order.push(key.to_vec());
        }
        Ok(())
    }

    fn generated_code(&self) -> String {
        self.order.iter().map(|k| self.plans[k].code.as_str()).collect::<Vec<_>>().join("\n")
    }
}

#[cfg(test)]
mod race_tests;
#[cfg(test)]
mod tests;
