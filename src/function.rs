//! Compiled functions. `FunctionBuilder` collects inputs, outputs, updates of shared variables and
//! givens; `compile` copies the reachable part of the user's graph into a program, adds the advance
//! of every random state it draws from, runs the rewrite pipeline and hands the program to the
//! device's backend. `Function::call` checks every argument against its input (dtype, rank, fixed
//! sizes, consistent symbolic sizes) before anything runs, then applies the updates with Theano's
//! semantics: every update is computed from the values before the call.

use crate::graph::Graph;
use crate::var::Var;
use kiln_codegen::{Backend, CompileOptions, Executable, Program, SharedValue};
use kiln_ir::ops::{Op, SharedId, SourceOp};
use kiln_ir::passes::{OptimizeOptions, RewriteLog};
use kiln_ir::specialize::{unify, Bindings};
use kiln_ir::{DType, Error, NodeId, Result, Tensor, TensorType};
use std::collections::HashMap;

/// Where a function runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// Machine code for this CPU, generated with Cranelift (the default).
    #[default]
    Cpu,
    /// The reference interpreter (ndarray), the oracle for every other backend.
    Reference,
    /// The CUDA GPU with this ordinal: CUDA C compiled by NVRTC, cuBLAS for products. Compiling
    /// for it fails with a clear error where no driver, cuBLAS or NVRTC is found; it never falls
    /// back to the CPU.
    Cuda(usize),
    /// The CUDA backend's program (its CUDA C, compiled as C++ against a shim of CUDA's built-ins)
    /// run on the CPU, with cuBLAS products done on the host: a testing device that checks the
    /// generated kernels where no GPU is present. Needs a C++ compiler (`$CXX`, else `g++`).
    CudaEmulator,
}

impl Device {
    pub(crate) fn backend(self) -> Box<dyn Backend> {
        match self {
            Device::Cpu => Box::new(kiln_codegen::cpu::Cpu),
            Device::Reference => Box::new(kiln_codegen::reference::Reference),
            Device::Cuda(ordinal) => Box::new(kiln_codegen::cuda::Cuda { ordinal }),
            Device::CudaEmulator => Box::new(kiln_codegen::cuda::emulator::CudaEmulator),
        }
    }

    /// Parses `cpu`, `reference`, `cuda`, `cuda:N` or `cuda-emulator` (for command-line flags).
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "reference" => Ok(Device::Reference),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "cuda-emulator" => Ok(Device::CudaEmulator),
            _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Ok(Device::Cuda(n)),
                None => {
                    Err(Error::Invalid(format!("unknown device '{s}' (cpu, reference, cuda, cuda:N, cuda-emulator)")))
                }
            },
        }
    }

    /// Why `Device::Cuda` cannot run on this machine, or `None` if it can.
    pub fn cuda_unavailable_reason() -> Option<String> {
        kiln_codegen::cuda::unavailable_reason()
    }
}

pub struct FunctionBuilder {
    graph: Graph,
    inputs: Vec<Var>,
    outputs: Vec<Var>,
    updates: Vec<(Var, Var)>,
    givens: Vec<(Var, Var)>,
    optimize: OptimizeOptions,
}

impl FunctionBuilder {
    pub(crate) fn new(graph: &Graph, inputs: Vec<Var>, outputs: Vec<Var>) -> FunctionBuilder {
        FunctionBuilder {
            graph: graph.clone(),
            inputs,
            outputs,
            updates: vec![],
            givens: vec![],
            optimize: Default::default(),
        }
    }
    /// New values for shared variables, all computed from the values before the call.
    pub fn updates<'a>(mut self, updates: impl IntoIterator<Item = (&'a Var, Var)>) -> Self {
        self.updates.extend(updates.into_iter().map(|(s, v)| (s.clone(), v)));
        self
    }
    /// Replaces variables by other expressions in this function only (Theano's givens).
    pub fn givens<'a>(mut self, givens: impl IntoIterator<Item = (&'a Var, Var)>) -> Self {
        self.givens.extend(givens.into_iter().map(|(s, v)| (s.clone(), v)));
        self
    }
    /// Chooses which optimizations run (all by default).
    pub fn optimize(mut self, opts: OptimizeOptions) -> Self {
        self.optimize = opts;
        self
    }

    pub fn compile(self, device: Device) -> Result<Function> {
        let g = &self.graph;
        let ids = |vs: &[Var]| vs.iter().map(|v| g.own(v)).collect::<Result<Vec<NodeId>>>();
        let inputs = ids(&self.inputs)?;
        let outputs = ids(&self.outputs)?;
        let st = g.state.borrow();
        let ir = &st.ir;
        for (v, &n) in self.inputs.iter().zip(&inputs) {
            if !matches!(ir.op(n), Op::Source(SourceOp::Input { .. })) {
                return Err(Error::Invalid(format!(
                    "function inputs must be graph inputs; {v:?} is {}",
                    ir.op(n).label()
                )));
            }
        }
        let mut update_targets = Vec::new();
        let mut update_values = Vec::new();
        for (target, value) in &self.updates {
            let (t, v) = (g.own(target)?, g.own(value)?);
            let Op::Source(SourceOp::Shared { id, name, ty }) = ir.op(t) else {
                return Err(Error::Invalid(format!("only shared variables can be updated, not {}", ir.op(t).label())));
            };
            let vty = ir.ty(v);
            let fits = vty.dtype == ty.dtype
                && vty.rank() == ty.rank()
                && vty.shape.iter().zip(&ty.shape).all(|(a, b)| a.fixed().is_none() || a == b);
            if !fits {
                return Err(Error::Invalid(format!("the update of '{name}' is {vty}, but '{name}' is {ty}")));
            }
            if update_targets.iter().any(|(i, _)| i == id) {
                return Err(Error::Invalid(format!("'{name}' is updated twice")));
            }
            update_targets.push((*id, t));
            update_values.push(v);
        }
        let mut substitute = HashMap::new();
        let mut known = Bindings::new();
        for (from, to) in &self.givens {
            let (f, t) = (g.own(from)?, g.own(to)?);
            if ir.ty(f).dtype != ir.ty(t).dtype || ir.ty(f).rank() != ir.ty(t).rank() {
                return Err(Error::Invalid(format!("givens: {} cannot replace {}", ir.ty(t), ir.ty(f))));
            }
            // A value of fixed shape fixes the symbolic sizes of what it replaces.
            if let Some(shape) = ir.ty(t).concrete() {
                unify(&ir.ty(f).shape, &shape, &mut known)
                    .map_err(|e| Error::Invalid(format!("givens: {} cannot replace {}: {e}", ir.ty(t), ir.ty(f))))?;
            }
            substitute.insert(f, t);
        }
        // The updated variables are roots too, so the program holds every variable it writes.
        let targets: Vec<NodeId> = update_targets.iter().map(|t| t.1).collect();
        let roots: Vec<NodeId> = outputs.iter().chain(&update_values).chain(&inputs).chain(&targets).copied().collect();
        let (mut prog, map) = ir.extract(&roots, &substitute)?;
        let prog_inputs: Vec<NodeId> = inputs.iter().map(|n| map[n]).collect();
        // Every input the outputs read must be passed.
        for n in prog.node_ids() {
            if let Op::Source(SourceOp::Input { name, .. }) = prog.op(n) {
                if !prog_inputs.contains(&n) {
                    return Err(Error::Invalid(format!(
                        "the outputs depend on input '{name}', which is not among the function's inputs"
                    )));
                }
            }
        }
        let mut prog_outputs: Vec<NodeId> = outputs.iter().chain(&update_values).map(|n| map[n]).collect();
        let mut updated: Vec<SharedId> = update_targets.iter().map(|(id, _)| *id).collect();
        // Random states advance by one call, unless the user updates them.
        let random_states: Vec<NodeId> = prog
            .node_ids()
            .into_iter()
            .filter(|&n| matches!(prog.op(n), Op::Random(_)))
            .map(|n| prog.inputs(n)[0])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for s in random_states {
            // A constant state (a frozen stream) draws the same numbers every call.
            let Op::Source(SourceOp::Shared { id, .. }) = prog.op(s).clone() else {
                continue;
            };
            if !updated.contains(&id) {
                let at = prog.node(s).at;
                let step = prog.constant(ndarray::arr1(&[0i64, 1]).into(), at);
                prog_outputs.push(prog.add2(s, step, at)?);
                updated.push(id);
            }
        }
        drop(st);
        prog.set_outputs(prog_outputs);
        let log = kiln_ir::passes::optimize(&mut prog, self.optimize)?;
        let mut shared: Vec<(SharedId, NodeId)> = prog
            .node_ids()
            .into_iter()
            .filter_map(|n| match prog.op(n) {
                Op::Source(SourceOp::Shared { id, .. }) => Some((*id, n)),
                _ => None,
            })
            .collect();
        shared.sort();
        let input_types: Vec<(String, TensorType)> = prog_inputs
            .iter()
            .map(|&n| match prog.op(n) {
                Op::Source(SourceOp::Input { name, ty }) => (name.clone(), ty.clone()),
                _ => unreachable!("checked above"),
            })
            .collect();
        let shared_ids: Vec<SharedId> = shared.iter().map(|s| s.0).collect();
        let updates = updated
            .iter()
            .enumerate()
            .map(|(k, id)| {
                (
                    outputs.len() + k,
                    shared_ids.iter().position(|s| s == id).expect("updated variables are in the program"),
                )
            })
            .collect();
        let program =
            Program { graph: prog, inputs: prog_inputs, shared: shared.iter().map(|s| s.1).collect(), updates, known };
        let exe = device.backend().compile(&program, &CompileOptions::default())?;
        Ok(Function { graph: self.graph.clone(), input_types, shared: shared_ids, program, exe, log, device })
    }
}

/// A compiled function: call it with ndarray values for its inputs.
pub struct Function {
    pub(crate) graph: Graph,
    input_types: Vec<(String, TensorType)>,
    /// Shared variables the program reads or writes, in the program's order.
    pub(crate) shared: Vec<SharedId>,
    pub(crate) program: Program,
    pub(crate) exe: Box<dyn Executable>,
    log: RewriteLog,
    device: Device,
}

/// Checks each argument against its input and binds the symbolic sizes.
fn check_args(input_types: &[(String, TensorType)], args: &[Tensor]) -> Result<()> {
    if args.len() != input_types.len() {
        let names: Vec<&str> = input_types.iter().map(|(n, _)| n.as_str()).collect();
        return Err(Error::Invalid(format!(
            "expected {} arguments ({}), got {}",
            names.len(),
            names.join(", "),
            args.len()
        )));
    }
    let mut b = Bindings::new();
    for ((name, ty), a) in input_types.iter().zip(args) {
        let fail = |detail: String| Error::Call { input: name.clone(), detail };
        if a.dtype() != ty.dtype {
            return Err(fail(format!("expected dtype {}, got {} (declared {ty})", ty.dtype, a.dtype())));
        }
        unify(&ty.shape, a.shape(), &mut b)
            .map_err(|e| fail(format!("declared {ty}, got shape {:?}: {e}", a.shape())))?;
    }
    Ok(())
}

/// Runs `exe` on checked arguments and the values of the shared variables `shared` of `graph`,
/// which it borrows for the call and writes the updates into.
fn run_on(graph: &Graph, shared: &[SharedId], exe: &mut dyn Executable, args: &[Tensor]) -> Result<Vec<Tensor>> {
    let inputs: Vec<&Tensor> = args.iter().collect();
    let mut st = graph.state.borrow_mut();
    let mut values: Vec<SharedValue> = shared
        .iter()
        .map(|id| {
            std::mem::replace(
                st.shared.get_mut(id).expect("variables live in their graph"),
                SharedValue::new(Tensor::zeros(DType::F32, &[0])),
            )
        })
        .collect();
    let result = exe.run(&inputs, &mut values);
    for (id, v) in shared.iter().zip(values) {
        st.shared.insert(*id, v);
    }
    result
}

impl Function {
    /// Runs the function; returns its outputs and then applies its updates.
    pub fn call(&mut self, args: &[Tensor]) -> Result<Vec<Tensor>> {
        check_args(&self.input_types, args)?;
        run_on(&self.graph, &self.shared, &mut *self.exe, args)
    }

    /// `call` on another executable of this function's program (an autotune's trial).
    pub(crate) fn call_on(&self, exe: &mut dyn Executable, args: &[Tensor]) -> Result<Vec<Tensor>> {
        check_args(&self.input_types, args)?;
        run_on(&self.graph, &self.shared, exe, args)
    }

    /// Compiles the specialization for these arguments' shapes now, without running (a call with
    /// the same shapes then only runs). Checks the arguments as `call` does.
    pub fn prepare(&mut self, args: &[Tensor]) -> Result<()> {
        let shapes = self.signature(args)?;
        self.exe.prepare(&shapes)
    }

    /// The shapes a call with these arguments specializes on: the arguments' (checked as `call`
    /// checks them), then the shared variables'.
    pub(crate) fn signature(&self, args: &[Tensor]) -> Result<Vec<Vec<usize>>> {
        check_args(&self.input_types, args)?;
        let st = self.graph.state.borrow();
        Ok(args
            .iter()
            .map(|a| a.shape().to_vec())
            .chain(self.shared.iter().map(|id| st.shared[id].shape().to_vec()))
            .collect())
    }

    /// Calls a function of one output and returns it.
    pub fn call1(&mut self, args: &[Tensor]) -> Result<Tensor> {
        let mut r = self.call(args)?;
        if r.len() != 1 {
            return Err(Error::Invalid(format!("call1 on a function with {} outputs", r.len())));
        }
        Ok(r.remove(0))
    }

    /// The optimized graph, Theano-style.
    pub fn debugprint(&self) -> String {
        kiln_ir::print::debugprint(&self.program.graph, self.program.graph.outputs(), Default::default())
    }
    /// The optimized graph with each node's user call site.
    pub fn debugprint_with_locations(&self) -> String {
        let opts = kiln_ir::print::PrintOptions { locations: true };
        kiln_ir::print::debugprint(&self.program.graph, self.program.graph.outputs(), opts)
    }
    /// The optimized graph as GraphViz DOT.
    pub fn to_dot(&self) -> String {
        kiln_ir::print::to_dot(&self.program.graph, self.program.graph.outputs())
    }
    /// Which rewrite rules fired while compiling, and how often.
    pub fn rewrite_log(&self) -> &RewriteLog {
        &self.log
    }
    /// The CUDA C the CUDA backend generates for a call with these arguments, whatever this
    /// function's device (printing it needs no GPU). Checks the arguments as `call` does.
    pub fn cuda_source(&self, args: &[Tensor]) -> Result<String> {
        kiln_codegen::cuda::program_source(&self.program, &self.signature(args)?)
    }
    /// The CUDA kernels as the CUDA backend compiles them for these arguments (no GPU needed).
    pub fn cuda_module(&self, args: &[Tensor]) -> Result<kiln_codegen::cuda::ast::Module> {
        kiln_codegen::cuda::program_module(&self.program, &self.signature(args)?)
    }
    /// The float products the CUDA backend may tile for these arguments, by kernel name, shape and
    /// layout: what a tile table (`KILN_CUDA_TILES`) lists, and what the product benchmark tunes.
    pub fn cuda_products(&self, args: &[Tensor]) -> Result<Vec<(String, kiln_codegen::cuda::ProductKey)>> {
        kiln_codegen::cuda::program_products(&self.program, &self.signature(args)?)
    }
    /// Compile time of each specialization (NVRTC and module load on CUDA, then a line on the
    /// streams' priorities; empty elsewhere).
    pub fn compile_stats(&self) -> Vec<String> {
        self.exe.compile_stats()
    }
    /// The time per step of the calls so far, where the backend was asked for a profile
    /// (`KILN_CUDA_PROFILE=1` or `KILN_CPU_PROFILE=1` when the function was compiled); printed, the
    /// per-step table.
    pub fn profile(&self) -> Option<kiln_codegen::Profile> {
        self.exe.profile()
    }
    /// The code the backend generated (empty for the reference interpreter).
    pub fn generated_code(&self) -> String {
        self.exe.generated_code()
    }
    pub fn device(&self) -> Device {
        self.device
    }
    /// The optimized program graph.
    pub fn optimized_graph(&self) -> &kiln_ir::Graph {
        &self.program.graph
    }
    /// The declared inputs: names and types.
    pub fn inputs(&self) -> &[(String, TensorType)] {
        &self.input_types
    }
}
