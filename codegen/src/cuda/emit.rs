//! Lowers a kernel program to the CUDA AST: one `__global__` kernel per loop kernel, gather,
//! scatter, random step and integer product, plus the list of device steps the runtime executes
//! (kernel launches and cuBLAS products, each product followed by its epilogue kernel). Sizes are
//! constants (every program is specialized), so index arithmetic divides by literals. Elementwise
//! kernels over contiguous float32 data read and write 16 bytes at a time; reductions run one
//! warp-shuffle block per output row when the reduced dim is contiguous, a 32x8 tile per 32
//! outputs when the kept dim is (column sums), or one thread per output when rows are short.
//! Kernels never read or write outside their buffers: views were checked by the lowering, and
//! indices read from buffers are checked in the kernel (an out-of-range index sets an error code
//! and reads element 0 instead).

use super::ast::*;
use super::scalar::{scalar_literal, Scalars};
use crate::kernel::{collapse, BufId, KernelProgram, LoopKernel, MatMul, Step, View};
use kiln_ir::ops::fused::{FusedKernel, ScalarExpr};
use kiln_ir::ops::UnaryOp;
use kiln_ir::{DType, Error, Loc, Result};

pub(super) const THREADS: u32 = 256;
pub(super) const MAX_GRID: usize = 65535;

/// What a kernel parameter is bound to at launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Buf(BufId),
    /// The program's error word (an `int`): kernels that read indices from buffers set it.
    ErrorFlag,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Launchable {
    pub kernel: String,
    pub args: Vec<KernelArg>,
    pub launch: Launch,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DeviceStep {
    Launch(Launchable),
    /// A float product through cuBLAS (its epilogue is the next step).
    Gemm(MatMul),
}

/// What a nonzero error word means: code `k` is `errors[k - 1]` (the op and the user's call site).
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorSite {
    pub op: &'static str,
    pub at: Loc,
    pub axis_len: usize,
}

pub struct DeviceProgram {
    pub module: Module,
    pub steps: Vec<DeviceStep>,
    pub errors: Vec<ErrorSite>,
}

/// The CUDA kernels and device steps of a kernel program.
pub fn emit(kp: &KernelProgram) -> Result<DeviceProgram> {
    let mut e = Emitter { kp, scalars: Scalars::default(), kernels: vec![], steps: vec![], errors: vec![] };
    for step in &kp.steps {
        match step {
            Step::Loop(k) => e.loop_kernel(k, &[])?,
            Step::MatMul(mm) if mm.dtype.is_float() => {
                e.steps.push(DeviceStep::Gemm(mm.clone()));
                if let Some(ep) = &mm.epilogue {
                    e.loop_kernel(ep, &[format!("{} runs as the epilogue of {}", ep.name, mm.name)])?;
                }
            }
            Step::MatMul(mm) => {
                e.int_matmul(mm);
                if let Some(ep) = &mm.epilogue {
                    e.loop_kernel(ep, &[format!("{} runs as the epilogue of {}", ep.name, mm.name)])?;
                }
            }
            Step::Gather(g) => e.gather(g, &g.name, false),
            Step::ScatterAdd(g) => e.gather(g, &g.name, true),
            Step::Random { name, op, state, out } => e.random(op, *state, *out, name),
        }
    }
    let mut names = std::collections::HashSet::new();
    if let Some(k) = e.kernels.iter().find(|k| !names.insert(k.name.as_str())) {
        return Err(Error::Invalid(format!("two CUDA kernels named {}", k.name)));
    }
    let module = Module { helpers: e.scalars.prelude(), kernels: e.kernels };
    Ok(DeviceProgram { module, steps: e.steps, errors: e.errors })
}

pub(super) struct Emitter<'a> {
    pub(super) kp: &'a KernelProgram,
    pub(super) scalars: Scalars,
    pub(super) kernels: Vec<Kernel>,
    pub(super) steps: Vec<DeviceStep>,
    pub(super) errors: Vec<ErrorSite>,
}

pub(super) fn grid_for(work: usize, per_block: usize) -> u32 {
    work.div_ceil(per_block).min(MAX_GRID) as u32
}

/// `blockIdx.x * blockDim.x + threadIdx.x` in the index type.
pub(super) fn global_id(it: CType) -> Expr {
    cast(it, Expr::Builtin(Builtin::BlockIdx)) * cast(it, Expr::Builtin(Builtin::BlockDim))
        + cast(it, Expr::Builtin(Builtin::ThreadIdx))
}

/// `for (it var = global id; var < end; var += grid size) body`: each index once, any grid size.
pub(super) fn grid_stride_loop(it: CType, var: &str, end: usize, body: Vec<Stmt>) -> Stmt {
    Stmt::For { ty: it, var: var.into(), init: global_id(it), end: int(end as i64), step: grid_stride(it), body }
}

/// Blocks of `THREADS` threads for `work` items (grid-stride loops cover any excess).
pub(super) fn launch_1d(work: usize) -> Launch {
    Launch { grid: (grid_for(work, THREADS as usize), 1), block: (THREADS, 1) }
}

pub(super) fn grid_stride(it: CType) -> Expr {
    cast(it, Expr::Builtin(Builtin::BlockDim)) * cast(it, Expr::Builtin(Builtin::GridDim))
}

/// Declares `i{first}..` as the multi-index of `flat` over `shape` (row-major).
pub(super) fn decompose(flat: Expr, shape: &[usize], first: usize, it: CType, out: &mut Vec<Stmt>) {
    let n = shape.len();
    if n == 0 {
        return;
    }
    if n == 1 {
        out.push(decl(it, format!("i{first}"), flat));
        return;
    }
    let rest = format!("rest{first}");
    out.push(decl_mut(it, rest.clone(), flat));
    for d in (1..n).rev() {
        let s = int(shape[d] as i64);
        out.push(decl(it, format!("i{}", first + d), var(&rest) % s.clone()));
        out.push(assign(var(&rest), var(&rest) / s));
    }
    out.push(decl(it, format!("i{first}"), var(&rest)));
}

/// `offset + sum(i_d * stride_d)`.
pub(super) fn offset(v: &View, dims: usize) -> Expr {
    let mut e: Option<Expr> = (v.offset != 0).then(|| int(v.offset as i64));
    for d in 0..dims.min(v.strides.len()) {
        let s = v.strides[d];
        if s == 0 {
            continue;
        }
        let term = if s == 1 { var(format!("i{d}")) } else { var(format!("i{d}")) * int(s as i64) };
        e = Some(match e {
            None => term,
            Some(acc) => acc + term,
        });
    }
    e.unwrap_or(int(0))
}

impl<'a> Emitter<'a> {
    pub(super) fn index_type(&self, k: &LoopKernel) -> CType {
        let big = |n: usize| n >= i32::MAX as usize / 2;
        let work: usize = k.shape.iter().product();
        let bufs = k.inputs.iter().chain(std::iter::once(&k.out)).map(|v| self.kp.buffers[v.buf].len);
        if big(work) || bufs.clone().any(big) {
            CType::LongLong
        } else {
            CType::Int
        }
    }

    pub(super) fn comments(&self, name: &str, origin: &[String], extra: &[String]) -> Vec<String> {
        let mut c: Vec<String> = extra.to_vec();
        c.extend(origin.iter().map(|o| format!("{name} computes {o}")));
        c
    }

    /// Parameters `in0..`, `out` of a loop kernel, and their arguments.
    pub(super) fn loop_params(&self, k: &LoopKernel) -> (Vec<Param>, Vec<KernelArg>) {
        let aliased = |b: BufId| b == k.out.buf;
        let mut params: Vec<Param> = k
            .inputs
            .iter()
            .zip(&k.input_dtypes)
            .enumerate()
            .map(|(j, (v, &d))| Param {
                ty: CType::of(d),
                name: format!("in{j}"),
                kind: if aliased(v.buf) { ParamKind::InAliased } else { ParamKind::In },
            })
            .collect();
        let out_kind = if k.inputs.iter().any(|v| aliased(v.buf)) { ParamKind::InOut } else { ParamKind::Out };
        params.push(Param { ty: CType::of(k.out_dtype), name: "out".into(), kind: out_kind });
        let mut args: Vec<KernelArg> = k.inputs.iter().map(|v| KernelArg::Buf(v.buf)).collect();
        args.push(KernelArg::Buf(k.out.buf));
        (params, args)
    }

    /// Declares `v{n}{suffix}` for each instruction (inputs are the given expressions) and returns
    /// the result and its dtype.
    pub(super) fn exprs(
        &mut self,
        k: &LoopKernel,
        dtypes: &[DType],
        inputs: &[Expr],
        suffix: &str,
        out: &mut Vec<Stmt>,
    ) -> Expr {
        let mut regs: Vec<Expr> = Vec::with_capacity(k.exprs.len());
        for (n, e) in k.exprs.iter().enumerate() {
            let value = match *e {
                ScalarExpr::Input(j) => {
                    regs.push(inputs[j].clone());
                    continue;
                }
                ScalarExpr::Const(c) => {
                    regs.push(scalar_literal(c));
                    continue;
                }
                ScalarExpr::Unary(op, a) => self.scalars.unary(op, dtypes[a], regs[a].clone()),
                ScalarExpr::Binary(op, a, b) => self.scalars.binary(op, dtypes[a], regs[a].clone(), regs[b].clone()),
                ScalarExpr::Where(c, a, b) => select(regs[c].clone(), regs[a].clone(), regs[b].clone()),
            };
            let name = format!("v{n}{suffix}");
            out.push(decl(CType::of(dtypes[n]), name.clone(), value));
            regs.push(var(name));
        }
        regs.pop().expect("a kernel has at least one instruction")
    }

    /// Loads of every input view at the current multi-index.
    pub(super) fn loads(&self, k: &LoopKernel, dims: usize, out: &mut Vec<Stmt>) -> Vec<Expr> {
        k.inputs
            .iter()
            .zip(&k.input_dtypes)
            .enumerate()
            .map(|(j, (v, &d))| {
                out.push(decl(CType::of(d), format!("x{j}"), index(var(format!("in{j}")), offset(v, dims))));
                var(format!("x{j}"))
            })
            .collect()
    }

    pub(super) fn loop_kernel(&mut self, k: &LoopKernel, extra: &[String]) -> Result<()> {
        let fk = FusedKernel { exprs: k.exprs.clone(), n_inputs: k.inputs.len(), reduce: None };
        let dtypes = fk.dtypes(&k.input_dtypes).map_err(Error::Invalid)?;
        let c = collapse(k);
        let comments = self.comments(&k.name, &k.origin, extra);
        let (params, args) = self.loop_params(&c);
        let (body, launch) = match c.reduce {
            None => self.elementwise(&c, &dtypes),
            Some((op, _)) => self.reduction(&c, &dtypes, op),
        };
        self.kernels.push(Kernel { name: k.name.clone(), comments, params, body, launch });
        self.steps.push(DeviceStep::Launch(Launchable { kernel: k.name.clone(), args, launch }));
        Ok(())
    }

    /// Stores `result` (of dtype `d`) into `out` at `at`, converting to the output dtype.
    pub(super) fn store(&mut self, k: &LoopKernel, d: DType, result: Expr, at: Expr) -> Stmt {
        let v = self.scalars.unary(UnaryOp::Cast(k.out_dtype), d, result);
        assign(index(var("out"), at), v)
    }

    pub(super) fn vectorizable(&self, k: &LoopKernel) -> bool {
        let n: usize = k.shape.iter().product();
        let f32_aligned = |v: &View, d: DType| d == DType::F32 && v.offset % 4 == 0;
        k.shape.len() == 1
            && n >= 4
            && k.out.strides[0] == 1
            && f32_aligned(&k.out, k.out_dtype)
            && k.inputs.iter().zip(&k.input_dtypes).all(|(v, &d)| match v.strides[0] {
                0 => true,
                1 => f32_aligned(v, d),
                _ => false,
            })
    }

    pub(super) fn elementwise(&mut self, k: &LoopKernel, dtypes: &[DType]) -> (Vec<Stmt>, Launch) {
        let it = self.index_type(k);
        let n: usize = k.shape.iter().product();
        let result_dtype = *dtypes.last().expect("non-empty");
        let mut body = vec![];
        let mut first_scalar = 0i64;
        if self.vectorizable(k) && result_dtype == DType::F32 {
            // Four elements per thread through 16-byte accesses; broadcast scalars are read once.
            let n4 = n / 4;
            let mut inner = vec![];
            let mut lanes_in: Vec<Vec<Expr>> = vec![vec![]; 4];
            for (j, (v, &d)) in k.inputs.iter().zip(&k.input_dtypes).enumerate() {
                let name = format!("x{j}");
                let base =
                    if v.offset == 0 { var(format!("in{j}")) } else { var(format!("in{j}")) + int(v.offset as i64) };
                if v.strides[0] == 0 {
                    body.push(decl(CType::of(d), name.clone(), index(base, int(0))));
                    lanes_in.iter_mut().for_each(|l| l.push(var(&name)));
                } else {
                    inner.push(decl(CType::Float4, name.clone(), Expr::Vec4(Box::new(base), Box::new(var("u")))));
                    for (l, lane) in lanes_in.iter_mut().enumerate() {
                        lane.push(Expr::Lane(Box::new(var(&name)), l as u8));
                    }
                }
            }
            let mut results = vec![];
            for (l, ins) in lanes_in.iter().enumerate() {
                let r = self.exprs(k, dtypes, ins, &format!("_{l}"), &mut inner);
                results.push(r);
            }
            let base = if k.out.offset == 0 { var("out") } else { var("out") + int(k.out.offset as i64) };
            inner.push(assign(Expr::Vec4(Box::new(base), Box::new(var("u"))), call("make_float4", results)));
            body.push(grid_stride_loop(it, "u", n4, inner));
            first_scalar = (n4 * 4) as i64;
            if n4 * 4 == n {
                return (body, Launch { grid: (grid_for(n4, THREADS as usize), 1), block: (THREADS, 1) });
            }
            body.push(Stmt::Comment("the last elements, one at a time".into()));
        }
        let mut inner = vec![];
        let rank = k.shape.len();
        decompose(var("i"), &k.shape, 0, it, &mut inner);
        let ins = self.loads(k, rank, &mut inner);
        let r = self.exprs(k, dtypes, &ins, "", &mut inner);
        let at = offset(&k.out, rank);
        inner.push(self.store(k, result_dtype, r, at));
        let init = if first_scalar > 0 { int(first_scalar) + global_id(it) } else { global_id(it) };
        body.push(Stmt::For { ty: it, var: "i".into(), init, end: int(n as i64), step: grid_stride(it), body: inner });
        // With the 16-byte loop first, the few elements left over go to its first threads.
        let work = if first_scalar > 0 { n / 4 } else { n };
        (body, Launch { grid: (grid_for(work, THREADS as usize), 1), block: (THREADS, 1) })
    }
}
