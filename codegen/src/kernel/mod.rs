//! The kernel program: the one lowering shared by the native backends. A specialized graph (every
//! shape concrete) becomes a list of buffers and a list of steps. Most steps are *loop kernels*: an
//! iteration space, strided views of input buffers (stride 0 broadcasts, negative strides reverse),
//! a scalar expression DAG, and an output view, optionally reducing the innermost dims. Elementwise
//! and fused nodes, reductions, permutes, broadcasts, slices, concatenations and slice gradients are
//! loop kernels; softmax, log-softmax and softmax cross-entropy are short sequences of them. Matrix
//! products, gathers, scatters and random numbers are their own steps. Nothing here is specific to
//! a code generator. Every view is checked against its buffer's bounds here, once, so generated
//! code never needs to check.

mod lower;
mod plan;
mod updates;

pub use lower::lower;
pub use plan::{collapse, elem_size, plan_memory, plan_memory_with, squeeze, MemoryPlan};
pub use updates::{place_updates, step_reads, step_writes, UpdateWrite};

use kiln_ir::ops::fused::ScalarExpr;
use kiln_ir::ops::{RandomOp, ReduceOp};
use kiln_ir::{DType, Error, Loc, Result, Tensor};

pub type BufId = usize;

#[derive(Clone, Debug, PartialEq)]
pub enum BufKind {
    /// The k-th input of the program.
    Input(usize),
    /// The k-th shared variable of the program.
    Shared(usize),
    Constant(Tensor),
    /// Written by a step.
    Temp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub dtype: DType,
    pub len: usize,
    pub kind: BufKind,
}

/// Elements of `buf` at `offset + sum(i_d * strides[d])` (in elements).
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub buf: BufId,
    pub offset: isize,
    pub strides: Vec<isize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoopKernel {
    /// Stable name: `k{step}_{what}`.
    pub name: String,
    /// The graph nodes (op and user call site) this kernel computes.
    pub origin: Vec<String>,
    /// The iteration space; with a reduction, its last `reduce.1` dims are reduced.
    pub shape: Vec<usize>,
    pub inputs: Vec<View>,
    pub input_dtypes: Vec<DType>,
    pub exprs: Vec<ScalarExpr>,
    /// The output; its strides cover the kept dims only when reducing.
    pub out: View,
    pub out_dtype: DType,
    /// (op, number of trailing reduced dims).
    pub reduce: Option<(ReduceOp, usize)>,
}

/// `c[b] = a[b] @ b[b]` for each batch item, operands row-major contiguous with batch strides (0
/// broadcasts an operand over the batch). A transposed operand is read from the buffer of the
/// matrix it transposes (strides swapped), so transposes feeding a product cost no copy.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMul {
    pub name: String,
    pub origin: Vec<String>,
    pub dtype: DType,
    pub a: BufId,
    pub b: BufId,
    pub c: BufId,
    /// `a` holds each batch item as `[k, m]` (so it is read transposed).
    pub a_transposed: bool,
    /// `b` holds each batch item as `[n, k]`.
    pub b_transposed: bool,
    pub batch: usize,
    pub a_batch_stride: usize,
    pub b_batch_stride: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// An elementwise kernel over `c` (bias, activation, an update...) run right after the product,
    /// on each row block by the core that computed it; only for single products (no batch).
    pub epilogue: Option<Box<LoopKernel>>,
}

/// A take along an axis or its gradient: the indexed side is `[outer, axis_len, inner]`, the
/// other side `[outer, idx.len(), inner]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gather {
    /// Stable name: `k{n}_take` or `k{n}_take_grad`.
    pub name: String,
    pub src: BufId,
    pub idx: BufId,
    pub out: BufId,
    pub outer: usize,
    pub axis_len: usize,
    pub inner: usize,
    pub dtype: DType,
    /// The user's call site, for index errors.
    pub at: Loc,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Loop(LoopKernel),
    MatMul(MatMul),
    /// numpy take: `out[o, j, i] = src[o, idx[j], i]`.
    Gather(Gather),
    /// The gradient of take: zeros, then `out[o, idx[j], i] += src[o, j, i]`.
    ScatterAdd(Gather),
    /// Random numbers of a random node (as many as `out` holds), from the state buffer (see
    /// kiln-ir's random module).
    Random {
        /// Stable name: `k{n}_random`.
        name: String,
        op: RandomOp,
        state: BufId,
        out: BufId,
    },
}

impl Step {
    /// The step's stable name (`k{n}_...`).
    pub fn name(&self) -> &str {
        match self {
            Step::Loop(k) => &k.name,
            Step::MatMul(m) => &m.name,
            Step::Gather(g) | Step::ScatterAdd(g) => &g.name,
            Step::Random { name, .. } => name,
        }
    }
}

#[derive(Clone, Debug)]
pub struct KernelProgram {
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    pub outputs: Vec<BufId>,
}

fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut s = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as isize;
    }
    s
}

/// A view of a contiguous buffer of shape `shape` broadcast (right-aligned) to `target`.
fn broadcast_view(buf: BufId, shape: &[usize], target: &[usize]) -> View {
    let base = contiguous_strides(shape);
    let lead = target.len() - shape.len();
    let strides = (0..target.len())
        .map(|d| if d < lead || (shape[d - lead] == 1 && target[d] != 1) { 0 } else { base[d - lead] })
        .collect();
    View { buf, offset: 0, strides }
}

/// Every element a loop kernel can touch lies inside its buffer.
fn check_loop(k: &LoopKernel, p: &KernelProgram) -> Result<()> {
    let fail = |what: String| Err(Error::Invalid(format!("kernel program out of bounds: {what}")));
    let span = |v: &View, shape: &[usize]| -> (isize, isize) {
        let (mut lo, mut hi) = (v.offset, v.offset);
        for (d, &s) in v.strides.iter().enumerate() {
            let reach = s * (shape[d] as isize - 1);
            if reach < 0 {
                lo += reach
            } else {
                hi += reach
            }
        }
        (lo, hi)
    };
    let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
    let mut views: Vec<(&View, &[usize])> = k.inputs.iter().map(|v| (v, &k.shape[..])).collect();
    views.push((&k.out, &k.shape[..kept]));
    for (v, shape) in views {
        if v.strides.len() != shape.len() {
            return fail(format!("{}: view rank {} for {} dims", k.name, v.strides.len(), shape.len()));
        }
        if shape.contains(&0) {
            continue; // an empty iteration touches nothing
        }
        let (lo, hi) = span(v, shape);
        if lo < 0 || hi >= p.buffers[v.buf].len as isize {
            return fail(format!("{}: [{lo}, {hi}] in a buffer of {}", k.name, p.buffers[v.buf].len));
        }
    }
    Ok(())
}

/// Every element a loop kernel can touch lies inside its buffer; every other step's sizes match.
pub fn check_bounds(p: &KernelProgram) -> Result<()> {
    let fail = |what: String| Err(Error::Invalid(format!("kernel program out of bounds: {what}")));
    for step in &p.steps {
        match step {
            Step::Loop(k) => check_loop(k, p)?,
            Step::MatMul(mm) => {
                let need = |stride: usize, one: usize| if mm.batch == 0 { 0 } else { stride * (mm.batch - 1) + one };
                let ok = p.buffers[mm.a].len >= need(mm.a_batch_stride, mm.m * mm.k)
                    && p.buffers[mm.b].len >= need(mm.b_batch_stride, mm.k * mm.n)
                    && p.buffers[mm.c].len == mm.batch * mm.m * mm.n;
                if !ok {
                    return fail(mm.name.clone());
                }
                if let Some(k) = &mm.epilogue {
                    check_loop(k, p)?;
                }
            }
            Step::Gather(g) | Step::ScatterAdd(g) => {
                let (indexed, other) = (g.outer * g.axis_len * g.inner, g.outer * p.buffers[g.idx].len * g.inner);
                let (src, out) = if matches!(step, Step::Gather(_)) { (indexed, other) } else { (other, indexed) };
                if p.buffers[g.src].len != src || p.buffers[g.out].len != out {
                    return fail("gather/scatter sizes".into());
                }
            }
            Step::Random { state, .. } => {
                if p.buffers[*state].len != 2 {
                    return fail("random state".into());
                }
            }
        }
    }
    Ok(())
}
