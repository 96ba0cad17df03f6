//! Float products through cuBLASLt (`KILN_CUDA_LT=1`, or `with_cublaslt` for one thread;
//! opt-in until timed on a card): each product too large to tile goes to cuBLASLt rather than
//! cuBLAS, at float32 accuracy (`CUBLAS_COMPUTE_32F`: no TF32), its algorithm timed among the
//! candidates of cuBLASLt's heuristic when the function is built (`lt_runtime`), as XLA tunes its
//! products. Where the product's epilogue is a bias added along the rows, with or without a ReLU
//! after it (`relu(a b + bias)`: a dense layer's forward pass), cuBLASLt's `BIAS` or `RELU_BIAS`
//! epilogue writes the layer's output from the product's registers: the epilogue's kernel is
//! gone, and so is the product's round trip through memory (fmnist-mlp-4k: two 4096x256 kernels
//! a step). Other epilogues stay kernels, after the product as after cuBLAS's.
//!
//! A product's epilogue is taken only where nothing else reads the product, the epilogue reads it
//! and writes its output in row-major order, the bias is a float vector of the product's columns
//! read along each row, and the output shares no memory with an operand. The bias is added to the
//! product's float value as the epilogue kernel adds it; the ReLU differs only for a NaN, which
//! kiln's ReLU keeps and cuBLASLt's may make 0.

use super::group::Location;
use super::tiled::walks_in_order;
use crate::kernel::{step_reads, BufId, KernelProgram, MatMul, View};
use kiln_ir::ops::elementwise::{BinaryOp, UnaryOp};
use kiln_ir::ops::fused::ScalarExpr;
use kiln_ir::DType;

/// Whether products go to cuBLASLt: by `with_cublaslt`, else by `KILN_CUDA_LT=1`; off by default.
pub(super) static CUBLASLT: super::Switch = super::Switch::new("KILN_CUDA_LT", false);

/// Runs `f` with the products that go to cuBLAS going to cuBLASLt instead, with the bias
/// epilogues it can compute (`on`), or not, for every CUDA program this thread specializes,
/// whatever the environment says.
pub fn with_cublaslt<R>(on: bool, f: impl FnOnce() -> R) -> R {
    CUBLASLT.with(on, f)
}

/// A product through cuBLASLt: `c = a b`, or with an epilogue `c = a b + bias` (along each row),
/// then `max(c, 0)` where it says `relu`.
#[derive(Clone, Debug, PartialEq)]
pub struct LtGemm {
    /// With an epilogue, `mm.c` is the epilogue's output (the product's own buffer is never
    /// written).
    pub mm: MatMul,
    pub epilogue: Option<LtEpilogue>,
}

/// A bias epilogue that cuBLASLt computes.
#[derive(Clone, Debug, PartialEq)]
pub struct LtEpilogue {
    pub bias: BufId,
    pub relu: bool,
    /// The epilogue kernel this replaces (for the step list).
    pub kernel: String,
}

impl LtGemm {
    /// What the step list says of it.
    pub fn describe(&self) -> String {
        let product = format!("cuBLASLt {}", super::print::product_operands(&self.mm));
        match &self.epilogue {
            None => product,
            Some(ep) => {
                let what = if ep.relu { "relu(product + bias)" } else { "product + bias" };
                format!("{product}, then {what} in its epilogue (no {} kernel)", ep.kernel)
            }
        }
    }

    /// The buffers it reads.
    pub fn reads(&self) -> Vec<BufId> {
        let mut reads = vec![self.mm.a, self.mm.b];
        reads.extend(self.epilogue.as_ref().map(|e| e.bias));
        reads
    }
}

/// The product of step `at` (one that goes to cuBLAS) as cuBLASLt computes it, where that is
/// asked for: with its epilogue where cuBLASLt can compute it (the module's conditions; the
/// epilogue then needs no kernel), else without. `None` where not asked for, or for a product
/// cuBLASLt is not used for (batched, or not float32).
pub(super) fn product(kp: &KernelProgram, at: usize, mm: &MatMul, loc: &[Location]) -> Option<LtGemm> {
    if !CUBLASLT.on() || mm.dtype != DType::F32 || mm.batch != 1 || mm.m * mm.n * mm.k == 0 {
        return None;
    }
    Some(with_epilogue(kp, at, mm, loc).unwrap_or_else(|| LtGemm { mm: mm.clone(), epilogue: None }))
}

fn with_epilogue(kp: &KernelProgram, at: usize, mm: &MatMul, loc: &[Location]) -> Option<LtGemm> {
    let ep = mm.epilogue.as_deref()?;
    let (m, n) = (mm.m, mm.n);
    let typed = ep.reduce.is_none() && ep.out_dtype == DType::F32 && ep.input_dtypes.iter().all(|&d| d == DType::F32);
    if !typed || ep.shape != [m, n] {
        return None;
    }
    let (relu, p, q) = bias_add(&ep.exprs)?;
    let (product, bias) = match (&ep.inputs[p], &ep.inputs[q]) {
        (x, y) if x.buf == mm.c => (x, y),
        (y, x) if x.buf == mm.c => (x, y),
        _ => return None,
    };
    let row_bias = |v: &View| {
        v.buf != mm.c
            && v.offset == 0
            && v.strides == [0, 1]
            && kp.buffers[v.buf].len == n
            && kp.buffers[v.buf].dtype == DType::F32
    };
    if !walks_in_order(product, &ep.shape) || !walks_in_order(&ep.out, &ep.shape) || !row_bias(bias) {
        return None;
    }
    // Only the epilogue reads the product, which is not returned either: it is never written now.
    let read_elsewhere = kp.steps.iter().enumerate().any(|(i, s)| i != at && step_reads(s).contains(&mm.c));
    if read_elsewhere || kp.outputs.contains(&mm.c) {
        return None;
    }
    // cuBLASLt's output may not overlap what it reads.
    let out = ep.out.buf;
    if [mm.a, mm.b, bias.buf].iter().any(|&r| loc[r] == loc[out]) {
        return None;
    }
    Some(LtGemm {
        mm: MatMul { c: out, epilogue: None, ..mm.clone() },
        epilogue: Some(LtEpilogue { bias: bias.buf, relu, kernel: ep.name.clone() }),
    })
}

/// Whether `exprs` is exactly `add(input p, input q)` or `relu(add(input p, input q))` (two
/// different inputs): `(relu, p, q)`.
fn bias_add(exprs: &[ScalarExpr]) -> Option<(bool, usize, usize)> {
    let (relu, sum) = match exprs.last()? {
        ScalarExpr::Unary(UnaryOp::Relu, x) => (true, *x),
        ScalarExpr::Binary(BinaryOp::Add, _, _) => (false, exprs.len() - 1),
        _ => return None,
    };
    let ScalarExpr::Binary(BinaryOp::Add, x, y) = exprs.get(sum)? else { return None };
    let (ScalarExpr::Input(p), ScalarExpr::Input(q)) = (exprs.get(*x)?, exprs.get(*y)?) else { return None };
    (exprs.len() == 3 + relu as usize && p != q).then_some((relu, *p, *q))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ScalarExpr::*;

    #[test]
    fn bias_adds_with_or_without_a_relu_after_them_and_nothing_else() {
        let add = vec![Input(0), Input(1), Binary(BinaryOp::Add, 0, 1)];
        assert_eq!(bias_add(&add), Some((false, 0, 1)));
        let relu = vec![Input(1), Input(0), Binary(BinaryOp::Add, 0, 1), Unary(UnaryOp::Relu, 2)];
        assert_eq!(bias_add(&relu), Some((true, 1, 0)));
        // Not a bias add: a product, an input added to itself, a sigmoid, something more.
        assert_eq!(bias_add(&[Input(0), Input(1), Binary(BinaryOp::Mul, 0, 1)]), None);
        assert_eq!(bias_add(&[Input(0), Input(0), Binary(BinaryOp::Add, 0, 1)]), None);
        assert_eq!(bias_add(&[Input(0), Input(1), Binary(BinaryOp::Add, 0, 1), Unary(UnaryOp::Sigmoid, 2)]), None);
        let more = vec![Input(0), Input(1), Input(2), Binary(BinaryOp::Add, 0, 1), Unary(UnaryOp::Relu, 3)];
        assert_eq!(bias_add(&more), None);
    }
}
