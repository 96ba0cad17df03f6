//! Lowers a kernel program to the CUDA AST: one `__global__` kernel per loop kernel, gather,
//! scatter, random step and integer product, plus the list of device steps the runtime executes
//! (kernel launches and cuBLAS products, each product followed by its epilogue kernel; a medium
//! float product is instead computed in tiles by its epilogue's kernel, `tiled`, which may then
//! also run later groups over the rows each block finished, `row_tail`). Sizes are
//! constants (every program is specialized), so index arithmetic divides by literals. Elementwise
//! kernels over float32 rows read and write 16 bytes at a time, beside operands broadcast along
//! the rows or across them (`elementwise`); reductions run one
//! warp-shuffle block per output row when the reduced dim is contiguous, a 32x8 tile per 32
//! outputs when the kept dim is (column sums), or one thread per output when rows are short. After
//! emission, runs of tiny kernels become single-block kernels (`single`) and independent neighbours
//! share a launch (`side`); the steps' dependencies are recorded for the scheduler (`schedule`).
//! Kernels never read or write outside their buffers: views were checked by the lowering, and
//! indices read from buffers are checked in the kernel (an out-of-range index lowers the error word
//! to its site's code, atomically, so the earliest site wins whatever the threads' order, and reads
//! element 0 instead).

use super::ast::*;
use super::group::{can_follow, collapse_group, forwarded, locations, Location};
use super::lt;
use super::row_tail;
use super::scalar::{scalar_literal, Scalars};
use super::side;
use super::single::{self, fits_a_run, join, SINGLE_BLOCK_ELEMENTS};
use super::tiled;
use crate::kernel::{BufId, KernelProgram, LoopKernel, MatMul, MemoryPlan, Step, View};
use kiln_ir::ops::fused::{FusedKernel, ScalarExpr};
use kiln_ir::ops::UnaryOp;
use kiln_ir::{DType, Error, Loc, Result};

pub(super) const THREADS: u32 = 256;
/// Float products of at most this many multiply-adds run as kiln's own kernel: on an H100 a cuBLAS
/// call costs 8-45 us for a 16x20x64 product (measured with events, `KILN_CUDA_PROFILE=1`), kiln's
/// one-thread-per-output kernel a few.
const SMALL_PRODUCT: usize = 1 << 19;
pub(super) const MAX_GRID: usize = 65535;
/// Smaller float products with a longer inner dimension than this are tiled too, its slices
/// spread over blocks, rather than computed as one dot product per output: those dots run one
/// after another in each thread. On an H100 (Nsight Compute) fmnist-mlp's 128x256x10 logits took
/// 18.6 us so, in 5 blocks, where tiled products of up to a million multiply-adds took 4.7-7.4.
/// `KILN_CUDA_DOT_DEPTH` sets another bound, to measure it on a card.
const DOT_DEPTH: usize = 64;

pub(super) fn dot_depth() -> usize {
    static DEPTH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::bound_from_env(&DEPTH, super::DOT_DEPTH_VAR, DOT_DEPTH)
}

/// What a kernel parameter is bound to at launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Buf(BufId),
    /// The program's error word (an `int`): kernels that read indices from buffers set it.
    ErrorFlag,
    /// Scratch buffer `k` of the program.
    Scratch(usize),
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
    /// A float product through cuBLASLt, with its epilogue where cuBLASLt computes it (`lt`).
    GemmLt(super::lt::LtGemm),
}

/// What an error word below `NO_ERROR` means: code `k` is `errors[k - 1]` (the op and the user's
/// call site).
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
    /// Sizes in bytes of the scratch buffers (`KernelArg::Scratch`), zeroed when allocated.
    pub scratch: Vec<usize>,
    /// For each step, the earlier steps it depends on (`schedule::dependencies`).
    pub deps: Vec<Vec<usize>>,
}

/// The CUDA kernels and device steps of a kernel program.
pub fn emit(kp: &KernelProgram, memory: &MemoryPlan) -> Result<DeviceProgram> {
    super::tile_table::table()?;
    let loc = locations(kp, memory);
    let small = |n: usize| n <= SINGLE_BLOCK_ELEMENTS;
    let forced = super::kernel_by_kernel_forced();
    let single_block = !forced
        && !kp.steps.is_empty()
        && kp.steps.iter().all(|s| match s {
            Step::Loop(k) => small(k.shape.iter().product()),
            Step::MatMul(mm) => {
                (!mm.dtype.is_float() || mm.batch * mm.m * mm.n * mm.k <= SMALL_PRODUCT)
                    && small(mm.batch * mm.m * mm.n)
                    && mm.epilogue.as_ref().is_none_or(|e| small(e.shape.iter().product()))
            }
            Step::Gather(g) | Step::ScatterAdd(g) => small(kp.buffers[g.out].len),
            Step::Random { out, .. } => small(kp.buffers[*out].len),
        });
    let mut e = Emitter {
        kp,
        scalars: Scalars::default(),
        kernels: vec![],
        steps: vec![],
        errors: vec![],
        scratch: vec![],
        extra: vec![],
        loc,
        group: vec![],
        single_block,
        product: None,
    };
    // Consecutive tiny steps become one single-block kernel (see `single`); `run[i]` is the first
    // step of step i's run, for steps in runs of two or more.
    let mut fits: Vec<bool> = kp.steps.iter().map(|s| !single_block && !forced && fits_a_run(kp, s)).collect();
    let mut run = single::runs(&fits);
    // Loop kernels, elementwise ones without their dims of size 1 so that a `[n, 1]` kernel can
    // follow one over `[n]` (see `group`).
    let squeezed: Vec<Option<LoopKernel>> = kp
        .steps
        .iter()
        .map(|s| match s {
            Step::Loop(k) => Some(crate::kernel::squeeze(k)),
            _ => None,
        })
        .collect();
    let mut step_run: Vec<Option<usize>> = vec![];
    // The tiled product kernel whose tail later groups may join (`row_tail`).
    let mut tail_target: Option<row_tail::TiledKernel> = None;
    let mut i = 0;
    while i < kp.steps.len() {
        e.single_block = single_block || run[i].is_some();
        let mut target = tail_target.take();
        // A loop kernel (or a product's epilogue) and the elementwise kernels that can follow it.
        let mut product = None;
        let (primary, extra) = match &kp.steps[i] {
            Step::Loop(k) => (Some(squeezed[i].as_ref().unwrap_or(k)), vec![]),
            Step::MatMul(mm) => 'product: {
                if big_product(mm) && !tiled::candidate(mm) {
                    match lt::product(kp, i, mm, &e.loc) {
                        None => e.steps.push(DeviceStep::Gemm(mm.clone())),
                        Some(lt) => {
                            let fused = lt.epilogue.is_some();
                            e.steps.push(DeviceStep::GemmLt(lt));
                            if fused {
                                // The epilogue is cuBLASLt's: no kernel of its own.
                                break 'product (None, vec![]);
                            }
                        }
                    }
                } else if mm.epilogue.is_some() {
                    // Emitted below: inside its epilogue where that is safe, else before it.
                    product = Some(mm);
                } else {
                    e.direct_matmul(mm);
                }
                let note = mm.epilogue.as_ref().map(|ep| format!("{} runs as the epilogue of {}", ep.name, mm.name));
                (mm.epilogue.as_deref(), note.into_iter().collect())
            }
            Step::Gather(g) => {
                e.gather(g, &g.name, false);
                (None, vec![])
            }
            Step::ScatterAdd(g) => {
                e.gather(g, &g.name, true);
                (None, vec![])
            }
            Step::Random { name, op, state, out } => {
                e.random(op, *state, *out, name);
                (None, vec![])
            }
        };
        let at = i;
        i += 1;
        if let Some(k) = primary {
            let mut members = vec![k];
            while let Some(Some(next)) = squeezed.get(i) {
                if !can_follow(&e.loc, &members, next) {
                    break;
                }
                members.push(next);
                i += 1;
            }
            if let Some(mut t) = target.take() {
                if let Some(in_epilogue) = e.tail_stage(&t, product, &members, at) {
                    // Emitted as a kernel of its own, then moved to the end of the tiled one.
                    e.single_block = single_block;
                    let note = in_epilogue.as_ref().map(|p| {
                        format!(
                            "{} computes the product of {} where it reads it (no {} kernel)",
                            k.name, p.mm.name, p.mm.name
                        )
                    });
                    e.product = in_epilogue;
                    e.loop_group(&members, &note.into_iter().collect::<Vec<_>>())?;
                    e.product = None;
                    if e.attach_tail_stage(&mut t, &members) {
                        // Its steps leave any run of tiny kernels they were in.
                        fits[at..i].iter_mut().for_each(|f| *f = false);
                        run = single::runs(&fits);
                    } else {
                        step_run.resize(e.steps.len() - 1, run[at]);
                        step_run.push(None);
                    }
                    tail_target = t.open(&e).then_some(t);
                    continue;
                }
                target = Some(t);
            }
            let mut extra = extra;
            if let Some(mm) = product {
                let fused = if big_product(mm) {
                    e.tiled_product(mm, &members, at)
                } else if forced {
                    None
                } else if deep_dots(mm) && !e.single_block {
                    e.tiled_product(mm, &members, at).or_else(|| e.product_in_epilogue(mm, &members, at))
                } else {
                    e.product_in_epilogue(mm, &members, at)
                };
                match fused {
                    Some(fused) => {
                        extra = vec![match fused.tiled {
                            None => format!(
                                "{} computes the product of {} where it reads it (no {} kernel)",
                                k.name, mm.name, mm.name
                            ),
                            Some(plan) => plan.describe(&k.name, mm),
                        }];
                        e.product = Some(fused);
                    }
                    None if big_product(mm) => e.steps.push(DeviceStep::Gemm(mm.clone())),
                    None => e.direct_matmul(mm),
                }
            }
            e.loop_group(&members, &extra)?;
            if let (Some(p), Some(mm)) = (e.product.take(), product) {
                if let Some(plan) = p.tiled {
                    target = Some(row_tail::TiledKernel::new(&e, mm, plan, &members));
                }
            }
        }
        step_run.resize(e.steps.len(), run[at]);
        // A stage may join later, past a few independent steps.
        tail_target = target.filter(|t| t.open(&e));
    }
    let (steps, kernels) = (std::mem::take(&mut e.steps), std::mem::take(&mut e.kernels));
    let (steps, kernels) = single::join_runs(steps, kernels, &step_run, &e.loc);
    // Whether the step will spread over several streams, as the runtime plans it (a profile's
    // single stream aside, so that a profile times the code that runs).
    let concurrent = super::streams_requested()?.unwrap_or_else(|| super::streams_and_memory(kp, None).0) > 1;
    (e.steps, e.kernels) =
        if !single_block && !forced { side::join_all(steps, kernels, &e.loc, concurrent) } else { (steps, kernels) };
    if single_block {
        let (kernel, step) =
            join("k_step", "the whole step", std::mem::take(&mut e.kernels), std::mem::take(&mut e.steps), &e.loc);
        e.kernels.push(kernel);
        e.steps.push(step);
    }
    let mut names = std::collections::HashSet::new();
    if let Some(k) = e.kernels.iter().find(|k| !names.insert(k.name.as_str())) {
        return Err(Error::Invalid(format!("two CUDA kernels named {}", k.name)));
    }
    for k in &mut e.kernels {
        super::dynamic_shared::place(k)?;
    }
    let deps = super::schedule::dependencies(&e.steps, &e.kernels, &e.loc);
    let mut module = Module { helpers: e.scalars.prelude(), kernels: e.kernels };
    if let Some(trigger) = super::dependent_launch::requested() {
        super::dependent_launch::prepare(&mut module, trigger);
    }
    Ok(DeviceProgram { module, steps: e.steps, errors: e.errors, scratch: e.scratch, deps })
}

/// Whether `mm` is a float product too large for kiln's one-thread-per-output kernel.
pub(super) fn big_product(mm: &MatMul) -> bool {
    mm.dtype.is_float() && mm.batch * mm.m * mm.n * mm.k > SMALL_PRODUCT
}

/// Whether `mm`, a product small enough for one thread per output, has dot products too long
/// for that (`DOT_DEPTH`).
fn deep_dots(mm: &MatMul) -> bool {
    mm.dtype == DType::F32 && mm.batch == 1 && mm.k > dot_depth()
}

pub(super) struct Emitter<'a> {
    pub(super) kp: &'a KernelProgram,
    pub(super) scalars: Scalars,
    pub(super) kernels: Vec<Kernel>,
    pub(super) steps: Vec<DeviceStep>,
    pub(super) errors: Vec<ErrorSite>,
    /// Scratch memory (bytes, zeroed once) that kernels use between blocks.
    pub(super) scratch: Vec<usize>,
    /// Parameters the kernel being emitted adds for its scratch memory.
    pub(super) extra: Vec<(Param, KernelArg)>,
    /// Where each buffer lives (buffers sharing a slot share memory).
    pub(super) loc: Vec<Location>,
    /// The loop kernels being emitted as one kernel, dims collapsed together (empty between groups).
    pub(super) group: Vec<Member>,
    /// Every kernel becomes a section of one single-block kernel (see `single`): reductions use
    /// only the shapes that work in one block of `THREADS`.
    pub(super) single_block: bool,
    /// A small product computed inside the group being emitted, where its first member reads it.
    pub(super) product: Option<ProductInEpilogue>,
}

/// A product computed by the threads of its epilogue: each thread computes the dot products of
/// the elements it reads (instead of loading them), so the product needs no kernel of its own.
#[derive(Clone, Debug)]
pub(super) struct ProductInEpilogue {
    pub(super) mm: MatMul,
    /// The first member's input that reads the product.
    pub(super) input: usize,
    /// Computed in tiles by the group's blocks (`tiled`), not a dot product per element.
    pub(super) tiled: Option<super::tiled::TilePlan>,
}

/// Where a group member's input comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Source {
    Memory,
    /// The register holding this earlier member's output.
    Register(usize),
    /// Computed in place (the group's `ProductInEpilogue`).
    Product,
}

/// A loop kernel of a group, and where each of its inputs comes from.
pub(super) struct Member {
    pub(super) kernel: LoopKernel,
    pub(super) dtypes: Vec<DType>,
    pub(super) sources: Vec<Source>,
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
    Launch { grid: (grid_for(work, THREADS as usize), 1), block: (THREADS, 1), cluster: 1 }
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

    /// Emits a loop kernel together with the elementwise kernels after it that can follow it
    /// (`group`), as one CUDA kernel named after the first.
    pub(super) fn loop_group(&mut self, members: &[&LoopKernel], extra: &[String]) -> Result<()> {
        let primary = members[0];
        let collapsed = collapse_group(members);
        let mut dtypes = vec![];
        for k in members {
            let fk = FusedKernel { exprs: k.exprs.clone(), n_inputs: k.inputs.len(), reduce: None };
            dtypes.push(fk.dtypes(&k.input_dtypes).map_err(Error::Invalid)?);
        }
        let mut comments = self.comments(&primary.name, &primary.origin, extra);
        for f in &members[1..] {
            for o in &f.origin {
                comments.push(format!("{} then computes {o} (merged {})", primary.name, f.name));
            }
        }
        let mut sources: Vec<Vec<Source>> = (0..members.len())
            .map(|m| {
                if m == 0 {
                    vec![Source::Memory; primary.inputs.len()]
                } else {
                    forwarded(&self.loc, members, m)
                        .into_iter()
                        .map(|f| f.map_or(Source::Memory, Source::Register))
                        .collect()
                }
            })
            .collect();
        if let Some(p) = &self.product {
            sources[0][p.input] = Source::Product;
        }
        self.group = collapsed
            .into_iter()
            .zip(dtypes)
            .zip(sources)
            .map(|((kernel, dtypes), sources)| Member { kernel, dtypes, sources })
            .collect();
        let (mut params, mut args) = self.group_params();
        let primary_c = self.group[0].kernel.clone();
        let tiled = self.product.as_ref().and_then(|p| p.tiled);
        let (body, launch) = match (primary_c.reduce, tiled) {
            (None, Some(plan)) => self.tiled_elementwise(plan),
            (None, None) => self.elementwise(),
            (Some((op, _)), _) => {
                let dtypes = self.group[0].dtypes.clone();
                self.reduction(&primary_c, &dtypes, op)
            }
        };
        self.group.clear();
        for (p, a) in self.extra.drain(..) {
            params.push(p);
            args.push(a);
        }
        let min_blocks = tiled.and_then(|plan| plan.blocks_per_sm());
        let macs_per_thread = tiled.map_or(0, |plan| plan.macs_per_thread());
        self.kernels.push(Kernel {
            name: primary.name.clone(),
            comments,
            params,
            body,
            launch,
            min_blocks,
            macs_per_thread,
        });
        self.steps.push(DeviceStep::Launch(Launchable { kernel: primary.name.clone(), args, launch }));
        Ok(())
    }

    /// A zeroed scratch buffer of `bytes` for the kernel being emitted, as parameter `name`.
    pub(super) fn scratch_param(&mut self, ty: CType, name: &str, bytes: usize) -> String {
        self.scratch.push(bytes);
        let arg = KernelArg::Scratch(self.scratch.len() - 1);
        self.extra.push((Param { ty, name: name.into(), kind: ParamKind::InOut }, arg));
        name.to_string()
    }

    /// Names of member `m`'s parameters: `in{j}`/`out` for the first, `f{m}_in{j}`/`f{m}_out` after.
    pub(super) fn param_name(m: usize, what: &str) -> String {
        if m == 0 {
            what.to_string()
        } else {
            format!("f{m}_{what}")
        }
    }

    /// Parameters and arguments of the current group: each member's loaded inputs, then its output.
    /// Memory the group writes is read and written without `__restrict__`.
    pub(super) fn group_params(&self) -> (Vec<Param>, Vec<KernelArg>) {
        let written: Vec<Location> = self.group.iter().map(|m| self.loc[m.kernel.out.buf]).collect();
        let read: Vec<Location> = self
            .group
            .iter()
            .flat_map(|m| {
                m.kernel
                    .inputs
                    .iter()
                    .zip(&m.sources)
                    .filter(|(_, s)| **s == Source::Memory)
                    .map(|(v, _)| self.loc[v.buf])
            })
            .collect();
        let (mut params, mut args) = (vec![], vec![]);
        if let Some(p) = &self.product {
            // The product's operands are only read (checked by `product_in_epilogue`).
            let t = CType::of(p.mm.dtype);
            params.push(Param { ty: t, name: "mm_a".into(), kind: ParamKind::In });
            params.push(Param { ty: t, name: "mm_b".into(), kind: ParamKind::In });
            args.extend([KernelArg::Buf(p.mm.a), KernelArg::Buf(p.mm.b)]);
        }
        for (mi, m) in self.group.iter().enumerate() {
            for (j, ((v, &d), src)) in m.kernel.inputs.iter().zip(&m.kernel.input_dtypes).zip(&m.sources).enumerate() {
                if *src != Source::Memory {
                    continue;
                }
                let kind = if written.contains(&self.loc[v.buf]) { ParamKind::InAliased } else { ParamKind::In };
                params.push(Param { ty: CType::of(d), name: Self::param_name(mi, &format!("in{j}")), kind });
                args.push(KernelArg::Buf(v.buf));
            }
            let l = self.loc[m.kernel.out.buf];
            let shared_out = read.contains(&l) || written.iter().filter(|&&w| w == l).count() > 1;
            let kind = if shared_out { ParamKind::InOut } else { ParamKind::Out };
            params.push(Param { ty: CType::of(m.kernel.out_dtype), name: Self::param_name(mi, "out"), kind });
            args.push(KernelArg::Buf(m.kernel.out.buf));
        }
        (params, args)
    }

    /// Loads of member `m`'s inputs at the current multi-index (`dims` index variables), each
    /// forwarded input taken from its register `y{k}{lane}`.
    pub(super) fn member_inputs(&mut self, m: usize, dims: usize, lane: &str, out: &mut Vec<Stmt>) -> Vec<Expr> {
        let suffix = if m == 0 { String::new() } else { format!("_f{m}") };
        let mem = &self.group[m];
        let inputs: Vec<(View, DType, Source)> = mem
            .kernel
            .inputs
            .iter()
            .zip(&mem.kernel.input_dtypes)
            .zip(&mem.sources)
            .map(|((v, &d), &s)| (v.clone(), d, s))
            .collect();
        let mut values = Vec::with_capacity(inputs.len());
        for (j, (v, d, src)) in inputs.into_iter().enumerate() {
            let name = format!("x{j}{suffix}");
            match src {
                Source::Register(k) => {
                    values.push(var(format!("y{k}{lane}")));
                    continue;
                }
                Source::Product if self.product.as_ref().is_some_and(|p| p.tiled.is_some()) => {
                    values.push(var("tile_value"));
                    continue;
                }
                Source::Product => {
                    let p = self.product.clone().expect("a product source has its product");
                    let small = p.mm.m * p.mm.n * p.mm.k.max(1) < i32::MAX as usize / 2;
                    let it = if small { CType::Int } else { CType::LongLong };
                    let flat = format!("c{j}{suffix}");
                    out.push(decl(it, &flat, offset(&v, dims)));
                    out.extend(self.product_element(&p.mm, it, &flat, &name));
                }
                Source::Memory => {
                    let param = var(Self::param_name(m, &format!("in{j}")));
                    out.push(decl(CType::of(d), name.clone(), index(param, offset(&v, dims))));
                }
            }
            values.push(var(name));
        }
        values
    }

    /// Declares member `m`'s value as it is stored, `y{m}{lane}` (converted to the output dtype),
    /// and returns it.
    pub(super) fn member_value(
        &mut self,
        m: usize,
        result: Expr,
        result_dtype: DType,
        lane: &str,
        out: &mut Vec<Stmt>,
    ) -> Expr {
        let out_dtype = self.group[m].kernel.out_dtype;
        let converted = self.scalars.unary(UnaryOp::Cast(out_dtype), result_dtype, result);
        let name = format!("y{m}{lane}");
        out.push(decl(CType::of(out_dtype), name.clone(), converted));
        var(name)
    }

    /// Member `m` at the current multi-index: loads, instructions, store (scalar path).
    pub(super) fn member_element(&mut self, m: usize, dims: usize, out: &mut Vec<Stmt>) {
        let ins = self.member_inputs(m, dims, "", out);
        let suffix = if m == 0 { String::new() } else { format!("_f{m}") };
        let (k, dtypes) = (self.group[m].kernel.clone(), self.group[m].dtypes.clone());
        let r = self.exprs(&k, &dtypes, &ins, &suffix, out);
        let y = self.member_value(m, r, *dtypes.last().expect("non-empty"), "", out);
        out.push(assign(index(var(Self::param_name(m, "out")), offset(&k.out, dims)), y));
    }

    /// Every follower at the current multi-index of the kept dims (after the first member stored).
    pub(super) fn followers_element(&mut self, dims: usize, out: &mut Vec<Stmt>) {
        for m in 1..self.group.len() {
            if self.group[m].kernel.reduce.is_some() {
                self.follower_reduction(m, out);
            } else if self.group[m].kernel.shape.len() > dims {
                self.follower_row_elements(m, dims, out);
            } else {
                self.member_element(m, dims, out);
            }
        }
    }
}
