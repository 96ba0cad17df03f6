//! The whole step as one kernel of one block, for programs whose every step is small (every loop
//! kernel at most `SINGLE_BLOCK_ELEMENTS` elements, no product large enough for cuBLAS); and in
//! other programs, each run of consecutive tiny kernels (at most `RUN_ELEMENTS` elements: a loss
//! over a batch of 128 rows of 10 classes and its gradient are eight) as one such kernel. Launch
//! latency, not arithmetic, is what such steps cost: keras-mlp is ~20 kernels of a few hundred
//! elements each. The kernels are emitted as usual (reductions restricted to the shapes that work
//! in one block of 1024 threads), then each becomes a section of one kernel: its parameters renamed
//! `s{k}_...`, `blockIdx` read as 0 and `gridDim` as 1 (so grid-stride loops become block-stride
//! loops), and `__syncthreads()` before each section that touches memory an earlier section since
//! the last barrier writes (or writes what one reads), which also makes those writes visible to it;
//! independent sections follow each other without a wait.

use super::ast::*;
use super::emit::{DeviceStep, Launchable};
use super::group::Location;
use super::side::accesses;
use crate::kernel::{KernelProgram, LoopKernel, Step};
use std::collections::HashMap;

/// Loop kernels up to this many elements can run in the single block.
pub(super) const SINGLE_BLOCK_ELEMENTS: usize = 1 << 16;
/// In a program with larger steps too, loop kernels of at most this many elements (a few passes of
/// the block) join a run of such kernels...
pub(super) const RUN_ELEMENTS: usize = 4096;
/// ...and products of at most this many multiply-adds (a few dozen per thread; `KILN_CUDA_RUN_MACS`
/// sets another bound, to measure on a card whether a larger product in the block beats a launch).
pub(super) const RUN_MACS: usize = 1 << 16;

fn run_macs() -> usize {
    static MACS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    super::bound_from_env(&MACS, super::RUN_MACS_VAR, RUN_MACS)
}
/// The single block's size: the largest, so a step's typical few hundred to thousand elements take
/// one pass (sections are latency-bound: each waits for the one before it).
pub(super) const SINGLE_BLOCK_THREADS: u32 = 1024;

/// Renames variables (`names`) and replaces CUDA built-ins (`builtin`, where it gives a value).
pub(super) fn rewrite_expr(e: &mut Expr, names: &HashMap<String, String>, builtin: &dyn Fn(Builtin) -> Option<Expr>) {
    match e {
        Expr::Var(n) => {
            if let Some(m) = names.get(n.as_str()) {
                *n = m.clone();
            }
        }
        Expr::Builtin(b) => {
            if let Some(v) = builtin(*b) {
                *e = v
            }
        }
        Expr::F32(_) | Expr::F64(_) | Expr::Int(_) | Expr::UInt(_) | Expr::ULong(_) | Expr::Bool(_) => {}
        Expr::Neg(a) | Expr::Not(a) | Expr::Cast(_, a) | Expr::Lane(a, _) => rewrite_expr(a, names, builtin),
        Expr::Binary(_, a, b) | Expr::Index(a, b) | Expr::Vec4(a, b) => {
            rewrite_expr(a, names, builtin);
            rewrite_expr(b, names, builtin);
        }
        Expr::Call(_, args) => args.iter_mut().for_each(|a| rewrite_expr(a, names, builtin)),
        Expr::Select(c, a, b) => {
            rewrite_expr(c, names, builtin);
            rewrite_expr(a, names, builtin);
            rewrite_expr(b, names, builtin);
        }
    }
}

/// `rewrite_expr` over statements.
pub(super) fn rewrite_stmts(
    body: &mut [Stmt],
    names: &HashMap<String, String>,
    builtin: &dyn Fn(Builtin) -> Option<Expr>,
) {
    for s in body {
        match s {
            Stmt::Comment(_)
            | Stmt::SharedArray { .. }
            | Stmt::SharedUnion { .. }
            | Stmt::Return
            | Stmt::Break
            | Stmt::SyncThreads
            | Stmt::Pragma(_) => {}
            Stmt::Decl { init, .. } => {
                if let Some(e) = init {
                    rewrite_expr(e, names, builtin)
                }
            }
            Stmt::Assign(a, b) | Stmt::Compound(_, a, b) => {
                rewrite_expr(a, names, builtin);
                rewrite_expr(b, names, builtin);
            }
            Stmt::If(c, a, b) => {
                rewrite_expr(c, names, builtin);
                rewrite_stmts(a, names, builtin);
                rewrite_stmts(b, names, builtin);
            }
            Stmt::For { init, end, step, body, .. } => {
                rewrite_expr(init, names, builtin);
                rewrite_expr(end, names, builtin);
                rewrite_expr(step, names, builtin);
                rewrite_stmts(body, names, builtin);
            }
            Stmt::ReturnValue(e) | Stmt::Call(e) => rewrite_expr(e, names, builtin),
            Stmt::Block(b) => rewrite_stmts(b, names, builtin),
            Stmt::Asm { outputs, inputs, emulated, .. } => {
                outputs.iter_mut().chain(inputs).for_each(|(_, e)| rewrite_expr(e, names, builtin));
                rewrite_expr(emulated, names, builtin);
            }
        }
    }
}

/// Section `s`'s parameter names, `s{s}_<name>`.
pub(super) fn section_names(s: usize, k: &Kernel) -> HashMap<String, String> {
    k.params.iter().map(|p| (p.name.clone(), format!("s{s}_{}", p.name))).collect()
}

/// Joins `kernels` (launched in order by `steps`; their loops stride by the block size, their
/// reductions were emitted for a block of `SINGLE_BLOCK_THREADS`) into one kernel named `name`, and
/// the one step that launches it. `what` says what it runs ("the whole step", "4 kernels").
pub(super) fn join(
    name: &str,
    what: &str,
    kernels: Vec<Kernel>,
    steps: Vec<DeviceStep>,
    loc: &[Location],
) -> (Kernel, DeviceStep) {
    let by_name: HashMap<String, Kernel> = kernels.into_iter().map(|k| (k.name.clone(), k)).collect();
    let mut comments = vec![format!("{name} runs {what} in one block, one section per kernel:")];
    let (mut params, mut args, mut body) = (vec![], vec![], vec![]);
    // What the sections since the last barrier read and write: a section that touches memory they
    // write, or writes memory they read, waits for them; one that does not runs on without a wait.
    let (mut read, mut written): (Vec<Location>, Vec<Location>) = (vec![], vec![]);
    for (s, step) in steps.into_iter().enumerate() {
        let DeviceStep::Launch(l) = step else { unreachable!("single-block programs have no cuBLAS steps") };
        let k = &by_name[&l.kernel];
        let (r, w) = accesses(k, &l.args, loc);
        if s > 0 && (r.iter().chain(&w).any(|x| written.contains(x)) || w.iter().any(|x| read.contains(x))) {
            body.push(Stmt::SyncThreads);
            read.clear();
            written.clear();
        }
        read.extend(r);
        written.extend(w);
        let names = section_names(s, k);
        for (p, a) in k.params.iter().zip(&l.args) {
            params.push(Param { name: names[&p.name].clone(), ..p.clone() });
            args.push(*a);
        }
        // Sections share memory through the pointers they are given: no `__restrict__`.
        comments.extend(k.comments.iter().map(|c| format!("  section {s}: {c}")));
        let mut section = k.body.clone();
        rewrite_stmts(&mut section, &names, &|b| match b {
            Builtin::BlockIdx => Some(Expr::Int(0)),
            Builtin::GridDim => Some(Expr::Int(1)),
            _ => None,
        });
        body.push(Stmt::Comment(format!("section {s}: {}", k.name)));
        body.push(Stmt::Block(section));
    }
    // The block's shared arrays are reused by the next launch's first sections only after this.
    body.push(Stmt::SyncThreads);
    for p in &mut params {
        p.kind = p.kind.without_restrict();
    }
    let launch = Launch { grid: (1, 1), block: (SINGLE_BLOCK_THREADS, 1), cluster: 1 };
    // One block: no number of blocks an SM to budget registers for.
    let kernel = Kernel::plain(name, comments, params, body, launch);
    (kernel, DeviceStep::Launch(Launchable { kernel: name.into(), args, launch }))
}

/// For each step, the first step of the run of tiny kernels it belongs to (`fits[j]`: step `j`
/// can join a run), for steps in runs of two or more.
pub(super) fn runs(fits: &[bool]) -> Vec<Option<usize>> {
    (0..fits.len())
        .map(|i| {
            let first = (0..=i).rev().take_while(|&j| fits[j]).last()?;
            let len = (first..fits.len()).take_while(|&j| fits[j]).count();
            (len >= 2).then_some(first)
        })
        .collect()
}

/// Joins each stretch of two or more device steps of the same run (`step_run`, one entry per
/// step) into one single-block kernel named after its first section.
pub(super) fn join_runs(
    steps: Vec<DeviceStep>,
    mut kernels: Vec<Kernel>,
    step_run: &[Option<usize>],
    loc: &[Location],
) -> (Vec<DeviceStep>, Vec<Kernel>) {
    let mut joined = vec![];
    let mut s = 0;
    while s < steps.len() {
        let len = match step_run[s] {
            Some(r) => step_run[s..].iter().take_while(|&&x| x == Some(r)).count(),
            None => 1,
        };
        let stretch = &steps[s..s + len];
        if len < 2 {
            joined.extend_from_slice(stretch);
            s += len;
            continue;
        }
        let names: Vec<&str> = stretch
            .iter()
            .map(|st| match st {
                DeviceStep::Launch(l) => l.kernel.as_str(),
                DeviceStep::Gemm(_) | DeviceStep::GemmLt(_) => unreachable!("runs have no cuBLAS products"),
            })
            .collect();
        let first = names[0].split('_').next().unwrap_or(names[0]);
        let name = format!("{first}_run");
        let sections: Vec<Kernel> = kernels.iter().filter(|k| names.contains(&k.name.as_str())).cloned().collect();
        let at = kernels.iter().position(|k| k.name == names[0]).expect("the run's first kernel");
        let (kernel, step) = join(&name, &format!("{len} kernels"), sections, stretch.to_vec(), loc);
        kernels.retain(|k| !names.contains(&k.name.as_str()));
        kernels.insert(at.min(kernels.len()), kernel);
        joined.push(step);
        s += len;
    }
    (joined, kernels)
}

/// Whether a step is small enough to be a section of a single-block run: a few passes of the
/// block, and reductions of short rows (a thread per row) or of a few rows (the block per row).
pub(super) fn fits_a_run(kp: &KernelProgram, s: &Step) -> bool {
    let small_loop = |k: &LoopKernel| {
        let n: usize = k.shape.iter().product();
        n <= RUN_ELEMENTS
            && k.reduce.is_none_or(|(_, r)| {
                let row_len: usize = k.shape[k.shape.len() - r..].iter().product();
                row_len <= 16 || n / row_len.max(1) <= 4
            })
    };
    match s {
        Step::Loop(k) => small_loop(k),
        Step::MatMul(mm) => {
            mm.batch * mm.m * mm.n * mm.k <= run_macs()
                && mm.batch * mm.m * mm.n <= RUN_ELEMENTS
                && mm.epilogue.as_deref().is_none_or(small_loop)
        }
        Step::Gather(g) | Step::ScatterAdd(g) => kp.buffers[g.out].len <= RUN_ELEMENTS,
        Step::Random { out, .. } => kp.buffers[*out].len <= RUN_ELEMENTS,
    }
}
