//! The CPU backend. Per shape signature of a call, the program is specialized, lowered to a kernel
//! program, every loop kernel is JIT-compiled with Cranelift, and temporary buffers are planned by
//! liveness (a buffer's memory is reused once its last reader has run) and allocated once; the plan
//! is cached, so a steady-state call allocates only its outputs. Inputs and shared variables are read
//! in place. Before any generated code runs, every argument's length is checked against the plan,
//! and every view the code can touch was checked against its buffer when the program was lowered.

#[cfg(target_arch = "x86_64")]
pub mod gemm;
pub mod jit;
pub mod math;
pub mod runtime;
pub mod team;

use crate::bytes::{tensor_bytes, tensor_from_bytes};
use crate::kernel::{elem_size, plan_memory};
use crate::kernel::{lower, place_updates, BufKind, KernelProgram, Step, UpdateWrite};
use crate::profile::StepProfile;
use crate::{Backend, CompileOptions, Executable, Program, SharedValue};
use jit::{Jit, KernelFn};
use kiln_ir::specialize::specialize_with;
use kiln_ir::{DType, Error, Result, Tensor};
use runtime::Bufs;
use std::collections::HashMap;

pub struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn compile(&self, program: &Program, _opts: &CompileOptions) -> Result<Box<dyn Executable>> {
        let profile = StepProfile::requested("KILN_CPU_PROFILE");
        Ok(Box::new(CpuExecutable {
            program: program.clone(),
            plans: HashMap::new(),
            order: vec![],
            last: vec![],
            profile,
        }))
    }
}

/// A JIT kernel over the given buffers; `split_len` is the outermost dim it can be split by.
struct LoopCall {
    f: KernelFn,
    bufs: Vec<usize>,
    split_len: Option<usize>,
    elements: usize,
}

enum Compiled {
    Loop(LoopCall),
    /// A product and the epilogue kernel run on each of its row blocks.
    MatMul(crate::kernel::MatMul, Option<LoopCall>),
    /// A take or its gradient, with the dtype of its indices.
    Gather(crate::kernel::Gather, DType),
    Scatter(crate::kernel::Gather, DType),
    Random {
        op: kiln_ir::ops::RandomOp,
        state: usize,
        out: usize,
    },
}

struct Plan {
    kp: KernelProgram,
    updates: Vec<UpdateWrite>,
    /// Indices into `kp.outputs` of the outputs `run` returns.
    returned: Vec<usize>,
    steps: Vec<Compiled>,
    /// Storage slot of each buffer that the plan owns (temporaries and constants).
    slot: Vec<Option<usize>>,
    storage: Vec<Vec<u64>>,
    out_shapes: Vec<Vec<usize>>,
    /// Whether some step is split across cores (a call then keeps to the caller's core).
    splits: bool,
    /// Per-call tables (buffer addresses and lengths, one kernel's views), kept to avoid allocating.
    scratch: (Vec<*mut u8>, Vec<usize>, Vec<*mut u8>),
    code: String,
    // Declared last: the machine code must outlive nothing that points into it.
    _jit: Jit,
}

pub struct CpuExecutable {
    program: Program,
    plans: HashMap<Vec<Vec<usize>>, Plan>,
    /// Shape signatures in the order they were first seen (for stable `generated_code`).
    order: Vec<Vec<Vec<usize>>>,
    /// The signature of the last call: a call with the same shapes finds its plan without allocating.
    last: Vec<Vec<usize>>,
    /// `KILN_CPU_PROFILE=1`: wall time of every step, printed when the function is dropped.
    profile: Option<StepProfile>,
}

impl Drop for CpuExecutable {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            eprint!("{}", p.profile("CPU"));
        }
    }
}

fn bytes_of(t: &Tensor) -> &[u8] {
    crate::bytes::standard_bytes(t).expect("caller passes standard-layout arrays")
}

fn bytes_of_mut(t: &mut Tensor) -> *mut u8 {
    kiln_ir::with_array!(t, a => a.as_slice_mut().expect("made standard before binding").as_mut_ptr() as *mut u8)
}

impl Plan {
    fn build(mut kp: KernelProgram, out_shapes: Vec<Vec<usize>>, program: &Program) -> Result<Plan> {
        let updates = place_updates(&mut kp, &program.updates);
        crate::kernel::check_bounds(&kp)?;
        let returned = program.returned();
        let mut code = String::new();
        for u in &updates {
            let (s, how) = match u {
                UpdateWrite::InPlace { shared } => (*shared, "written in place".to_string()),
                UpdateWrite::CopyAtEnd { shared, .. } => (*shared, "copied in after the last step".to_string()),
            };
            let name = program.graph.node(program.shared[s]).op.label();
            code.push_str(&format!("; update of shared variable '{name}': {how}\n"));
        }
        let mut jit = Jit::new()?;
        let mut compiled: HashMap<String, jit::CompiledKernel> = HashMap::new();
        for step in &kp.steps {
            let kernel = match step {
                Step::Loop(k) => Some(k),
                Step::MatMul(m) => m.epilogue.as_deref(),
                _ => None,
            };
            if let Some(k) = kernel {
                let ck = jit.compile(k)?;
                if let Step::MatMul(m) = step {
                    code.push_str(&format!("; {} runs as the epilogue of {}\n", k.name, m.name));
                }
                code.push_str(&ck.clif);
                code.push('\n');
                compiled.insert(k.name.clone(), ck);
            }
        }
        jit.finalize()?;
        // Every thread that may run a product gets its packing buffers now, not during a call.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let widest = kp.steps.iter().filter_map(|s| match s {
                Step::MatMul(m) if m.dtype == DType::F32 => Some(m.n),
                _ => None,
            });
            if let Some(n) = widest.max() {
                gemm::reserve_packing(n);
            }
        }
        let mut call = |k: &crate::kernel::LoopKernel| {
            let ck = &compiled[&k.name];
            let mut bufs: Vec<usize> = k.inputs.iter().map(|v| v.buf).collect();
            bufs.push(k.out.buf);
            LoopCall { f: jit.function(ck.id), bufs, split_len: ck.split_len, elements: ck.elements }
        };
        let mut steps = Vec::with_capacity(kp.steps.len());
        for step in &kp.steps {
            let dt = |b: usize| kp.buffers[b].dtype;
            steps.push(match step {
                Step::Loop(k) => Compiled::Loop(call(k)),
                Step::MatMul(m) => Compiled::MatMul(m.clone(), m.epilogue.as_deref().map(&mut call)),
                Step::Gather(g) => Compiled::Gather(g.clone(), dt(g.idx)),
                Step::ScatterAdd(g) => Compiled::Scatter(g.clone(), dt(g.idx)),
                Step::Random { op, state, out, .. } => Compiled::Random { op: op.clone(), state: *state, out: *out },
            });
        }
        let splits = steps.iter().any(|s| match s {
            Compiled::Loop(c) => c.split_len.is_some_and(|l| l > 1) && c.elements >= PARALLEL_ELEMENTS,
            Compiled::MatMul(m, _) => m.m * m.k * m.n >= runtime::PARALLEL_GEMM_MACS,
            _ => false,
        });
        let memory = plan_memory(&kp);
        let mut storage: Vec<Vec<u64>> = memory.slot_bytes.iter().map(|&n| vec![0u64; n / 8]).collect();
        for (b, buf) in kp.buffers.iter().enumerate() {
            if let (BufKind::Constant(t), Some(sl)) = (&buf.kind, memory.slot[b]) {
                let src = tensor_bytes(t);
                // SAFETY: the slot holds at least the constant's bytes.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), storage[sl].as_mut_ptr() as *mut u8, src.len()) };
            }
        }
        let slot = memory.slot;
        let scratch =
            (Vec::with_capacity(kp.buffers.len()), Vec::with_capacity(kp.buffers.len()), Vec::with_capacity(16));
        Ok(Plan { kp, updates, returned, steps, slot, storage, out_shapes, splits, scratch, code, _jit: jit })
    }
}

/// Kernels with fewer elements than this run on one core.
const PARALLEL_ELEMENTS: usize = 1 << 15;

/// The view table of a kernel, shared (read-only) by the parts of a split kernel.
#[derive(Clone, Copy)]
struct Table(*const *mut u8);
// SAFETY: the table is only read; the parts of a split kernel write disjoint elements.
unsafe impl Send for Table {}
unsafe impl Sync for Table {}

impl Table {
    /// # Safety
    /// As the kernel's: a valid table and a range inside [0, split_len).
    unsafe fn run(self, f: KernelFn, begin: usize, end: usize) {
        unsafe { f(self.0, begin as i64, end as i64) }
    }
}

/// Runs a kernel, split by its outermost dim across the cores when it is large.
///
/// # Safety
/// `table` must hold the kernel's valid view addresses.
unsafe fn run_loop(f: KernelFn, table: &[*mut u8], split_len: Option<usize>, elements: usize) {
    let t = Table(table.as_ptr());
    let len = split_len.unwrap_or(1);
    let team = team::Team::global();
    let parts = if split_len.is_some() && elements >= PARALLEL_ELEMENTS { team.threads().min(len) } else { 1 };
    if parts <= 1 {
        return unsafe { t.run(f, 0, len) };
    }
    let per = len.div_ceil(parts);
    team.run(parts, &|i| {
        let (b, e) = (i * per, ((i + 1) * per).min(len));
        if b < e {
            // SAFETY: [b, e) lies inside [0, len) and no other part covers it.
            unsafe { t.run(f, b, e) }
        }
    });
}

impl Executable for CpuExecutable {
    fn run(&mut self, inputs: &[&Tensor], shared: &mut [SharedValue]) -> Result<Vec<Tensor>> {
        crate::with_host_values(shared, |shared| self.run_host(inputs, shared))
    }

    fn prepare(&mut self, key: &[Vec<usize>]) -> Result<()> {
        if !self.plans.contains_key(key) {
            let sources = self.program.inputs.iter().chain(&self.program.shared);
            let shapes = sources.zip(key).map(|(&n, s)| (n, s.clone())).collect();
            let (g, _) = specialize_with(&self.program.graph, &shapes, &self.program.known)?;
            let kp = lower(&g, &self.program.inputs, &self.program.shared)?;
            let out_shapes = g.outputs().iter().map(|&o| g.ty(o).concrete().expect("specialized")).collect();
            self.plans.insert(key.to_vec(), Plan::build(kp, out_shapes, &self.program)?);
            self.order.push(key.to_vec());
        }
        Ok(())
    }

    fn profile(&self) -> Option<crate::Profile> {
        self.profile.as_ref().map(|p| p.profile("CPU"))
    }

    fn generated_code(&self) -> String {
        self.order.iter().map(|k| self.plans[k].code.as_str()).collect::<Vec<_>>().join("\n")
    }
}

impl CpuExecutable {
    fn run_host(&mut self, inputs: &[&Tensor], shared: &mut [Tensor]) -> Result<Vec<Tensor>> {
        let shapes = inputs.iter().map(|t| t.shape()).chain(shared.iter().map(|t| t.shape()));
        let same_as_last = self.last.len() == inputs.len() + shared.len()
            && shapes.clone().zip(&self.last).all(|(s, l)| s == l.as_slice());
        if !same_as_last {
            let key: Vec<Vec<usize>> = shapes.map(|s| s.to_vec()).collect();
            self.prepare(&key)?;
            self.last = key;
        }
        let plan = self.plans.get_mut(&self.last).expect("prepared");
        // Inputs in standard layout are read in place (others are copied); shared variables are
        // made standard once and then read and written in place.
        let inputs: Vec<std::borrow::Cow<Tensor>> = inputs
            .iter()
            .map(|t| {
                if kiln_ir::with_array!(t, a => a.is_standard_layout()) {
                    std::borrow::Cow::Borrowed(*t)
                } else {
                    std::borrow::Cow::Owned(kiln_ir::map_array!(t, a => a.as_standard_layout().into_owned()))
                }
            })
            .collect();
        for t in shared.iter_mut() {
            if !kiln_ir::with_array!(t, a => a.is_standard_layout()) {
                *t = kiln_ir::map_array!(t, a => a.as_standard_layout().into_owned());
            }
        }
        let (mut ptr, mut len, mut table) = std::mem::take(&mut plan.scratch);
        ptr.clear();
        len.clear();
        for (b, buf) in plan.kp.buffers.iter().enumerate() {
            let (p, have) = match buf.kind {
                BufKind::Input(k) => (bytes_of(&inputs[k]).as_ptr() as *mut u8, (inputs[k].len(), inputs[k].dtype())),
                BufKind::Shared(k) => (bytes_of_mut(&mut shared[k]), (shared[k].len(), shared[k].dtype())),
                // A buffer without a slot is no longer used (an update now written in place).
                _ => match plan.slot[b] {
                    Some(sl) => (plan.storage[sl].as_mut_ptr() as *mut u8, (buf.len, buf.dtype)),
                    None => (std::ptr::null_mut(), (buf.len, buf.dtype)),
                },
            };
            if have != (buf.len, buf.dtype) {
                return Err(Error::Invalid(format!(
                    "a value of {} {} was bound to a buffer of {} {}",
                    have.0, have.1, buf.len, buf.dtype
                )));
            }
            ptr.push(p);
            len.push(buf.len);
        }
        let bufs = Bufs { ptr: &ptr, len: &len };
        // Indices that come from arguments are checked before any step runs, so a bad index fails
        // the call before an update is written in place. (Computed indices are checked when used.)
        for step in &plan.steps {
            let (Compiled::Gather(a, idx_dtype) | Compiled::Scatter(a, idx_dtype)) = step else { continue };
            if plan.kp.buffers[a.idx].kind != BufKind::Temp {
                let op = if matches!(step, Compiled::Gather(..)) { "take" } else { "take_grad" };
                runtime::check_indices(a, *idx_dtype, &bufs, op)?;
            }
        }
        let _pin = plan.splits.then(|| team::Team::global().pin_caller());
        for (i, step) in plan.steps.iter().enumerate() {
            let started = self.profile.is_some().then(std::time::Instant::now);
            match step {
                Compiled::Loop(call) => {
                    table.clear();
                    table.extend(call.bufs.iter().map(|&b| ptr[b]));
                    // SAFETY: the table holds one valid base address per view of this kernel, each
                    // buffer at least as long as the lowering checked every view against; the
                    // ranges given to the parts of a split kernel cover [0, len) without overlap, so
                    // the parts write disjoint elements.
                    unsafe { run_loop(call.f, &table, call.split_len, call.elements) };
                }
                Compiled::MatMul(m, None) => {
                    runtime::matmul(m, &bufs, None);
                }
                Compiled::MatMul(m, Some(e)) => {
                    table.clear();
                    table.extend(e.bufs.iter().map(|&b| ptr[b]));
                    let t = Table(table.as_ptr());
                    // The epilogue's outermost dim covers the product's rows `q` elements at a time.
                    let q = e.split_len.filter(|&l| m.m > 0 && l % m.m == 0).map(|l| l / m.m);
                    // SAFETY: as for a loop kernel; rows [r0, r1) of the product map to the
                    // epilogue range [r0 q, r1 q), and row blocks are disjoint.
                    let per_rows =
                        move |r0: usize, r1: usize| unsafe { t.run(e.f, r0 * q.unwrap_or(0), r1 * q.unwrap_or(0)) };
                    let covered = runtime::matmul(m, &bufs, q.map(|_| &per_rows as &(dyn Fn(usize, usize) + Sync)));
                    if !covered {
                        // SAFETY: as for a loop kernel.
                        unsafe { run_loop(e.f, &table, e.split_len, e.elements) };
                    }
                }
                Compiled::Gather(a, idx_dtype) => runtime::gather(a, *idx_dtype, &bufs)?,
                Compiled::Scatter(a, idx_dtype) => runtime::scatter_add(a, *idx_dtype, &bufs)?,
                Compiled::Random { op, state, out } => runtime::random(op, *state, *out, &bufs),
            }
            if let (Some(p), Some(t)) = (&mut self.profile, started) {
                p.add(plan.kp.steps[i].name(), t.elapsed().as_secs_f64());
            }
        }
        let outs = plan
            .returned
            .iter()
            .map(|&o| {
                let b = plan.kp.outputs[o];
                let d = plan.kp.buffers[b].dtype;
                let n = plan.kp.buffers[b].len * elem_size(d) as usize;
                // SAFETY: the buffer is valid for its declared length.
                let bytes = unsafe { std::slice::from_raw_parts(ptr[b] as *const u8, n) };
                tensor_from_bytes(d, &plan.out_shapes[o], bytes)
            })
            .collect();
        for u in &plan.updates {
            if let UpdateWrite::CopyAtEnd { from, shared: s } = *u {
                let n = plan.kp.buffers[from].len * elem_size(plan.kp.buffers[from].dtype) as usize;
                let dst = bytes_of_mut(&mut shared[s]);
                if shared[s].len() != plan.kp.buffers[from].len || shared[s].dtype() != plan.kp.buffers[from].dtype {
                    return Err(Error::Invalid(format!(
                        "an update would change a shared variable's shape ({})",
                        shared[s].ty()
                    )));
                }
                // SAFETY: both are valid for n bytes (checked just above) and are different buffers
                // (update values are temporaries, never a variable's own buffer).
                unsafe { std::ptr::copy_nonoverlapping(ptr[from] as *const u8, dst, n) };
            }
        }
        plan.scratch = (ptr, len, table);
        Ok(outs)
    }
}
