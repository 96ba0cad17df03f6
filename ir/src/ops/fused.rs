//! Fused kernels: a maximal elementwise region of the graph, as a scalar expression DAG over the
//! region's operands (broadcast to one shape), optionally ending in a reduction (the elementwise
//! prologue of a sum, mean, max, min or prod). This is what the code generators lower to one loop
//! nest. The reference semantics evaluate the DAG with the same scalar functions as the unfused ops,
//! so fusion never changes a value.

use crate::ops::elementwise::{binary_scalar, eval_map, infer_binary, infer_unary, unary_scalar};
use crate::ops::{reduce, BinaryOp, ReduceOp, Scalar, UnaryOp};
use crate::tensor::Tensor;
use crate::types::{broadcast_shapes, DType, TensorType};

/// One instruction of a fused kernel; operands index earlier instructions.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum ScalarExpr {
    Input(usize),
    Const(Scalar),
    Unary(UnaryOp, usize),
    Binary(BinaryOp, usize, usize),
    Where(usize, usize, usize),
}

#[derive(Clone, PartialEq, Debug)]
pub struct FusedKernel {
    /// Instructions in dependency order; the last one is the kernel's (elementwise) result.
    pub exprs: Vec<ScalarExpr>,
    pub n_inputs: usize,
    /// A reduction applied to the elementwise result: (op, sorted axes, keepdims).
    pub reduce: Option<(ReduceOp, Vec<usize>, bool)>,
}

impl FusedKernel {
    /// The dtype of every instruction, or why the program is ill-typed.
    pub fn dtypes(&self, inputs: &[DType]) -> Result<Vec<DType>, String> {
        let mut d: Vec<DType> = Vec::with_capacity(self.exprs.len());
        let s = TensorType::scalar;
        for e in &self.exprs {
            let t = match *e {
                ScalarExpr::Input(i) => *inputs.get(i).ok_or("fused input index out of range")?,
                ScalarExpr::Const(c) => c.dtype(),
                ScalarExpr::Unary(op, a) => infer_unary(op, &s(d[a]))?.dtype,
                ScalarExpr::Binary(op, a, b) => infer_binary(op, &s(d[a]), &s(d[b]))?.dtype,
                ScalarExpr::Where(c, a, b) => crate::ops::elementwise::infer_where(&s(d[c]), &s(d[a]), &s(d[b]))?.dtype,
            };
            d.push(t);
        }
        Ok(d)
    }

    /// The type of the elementwise result, before any reduction.
    fn elementwise_type(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        if inputs.len() != self.n_inputs {
            return Err(format!("expects {} operands, got {}", self.n_inputs, inputs.len()));
        }
        let dtypes: Vec<DType> = inputs.iter().map(|t| t.dtype).collect();
        let dtype = *self.dtypes(&dtypes)?.last().ok_or("empty fused kernel")?;
        let mut shape = vec![];
        for t in inputs {
            shape = broadcast_shapes(&shape, &t.shape).ok_or("operand shapes do not broadcast")?;
        }
        Ok(TensorType::new(dtype, shape))
    }

    pub fn infer(&self, inputs: &[&TensorType]) -> Result<TensorType, String> {
        let t = self.elementwise_type(inputs)?;
        match &self.reduce {
            None => Ok(t),
            Some((op, axes, keepdims)) => reduce::infer(*op, axes, *keepdims, &t),
        }
    }

    /// Evaluates the DAG on one element's operands.
    pub fn eval_scalar(&self, args: &[Scalar], regs: &mut Vec<Scalar>) -> Scalar {
        regs.clear();
        for e in &self.exprs {
            let v = match *e {
                ScalarExpr::Input(i) => args[i],
                ScalarExpr::Const(c) => c,
                ScalarExpr::Unary(op, a) => unary_scalar(op, regs[a]),
                ScalarExpr::Binary(op, a, b) => binary_scalar(op, regs[a], regs[b]),
                ScalarExpr::Where(c, a, b) => {
                    if regs[c] == Scalar::Bool(true) {
                        regs[a]
                    } else {
                        regs[b]
                    }
                }
            };
            regs.push(v);
        }
        *regs.last().expect("non-empty kernel")
    }

    pub fn eval(&self, inputs: &[&Tensor], out: &TensorType) -> Result<Tensor, String> {
        let tys: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
        let ety = self.elementwise_type(&tys.iter().collect::<Vec<_>>())?;
        let regs = std::cell::RefCell::new(Vec::with_capacity(self.exprs.len()));
        let elems = eval_map(inputs, &ety, |a| self.eval_scalar(a, &mut regs.borrow_mut()))?;
        match &self.reduce {
            None => Ok(elems),
            Some((op, axes, keepdims)) => reduce::eval(*op, axes, *keepdims, &elems, out),
        }
    }

    /// A readable one-line form: `fused{e1=exp(i0); add(e1, mul(e1, i1))}` (instructions read more
    /// than once get a name), followed by the reduction if any.
    pub fn label(&self) -> String {
        let mut uses = vec![0usize; self.exprs.len()];
        for e in &self.exprs {
            match *e {
                ScalarExpr::Unary(_, a) => uses[a] += 1,
                ScalarExpr::Binary(_, a, b) => {
                    uses[a] += 1;
                    uses[b] += 1
                }
                ScalarExpr::Where(c, a, b) => {
                    uses[c] += 1;
                    uses[a] += 1;
                    uses[b] += 1
                }
                _ => {}
            }
        }
        let mut text: Vec<String> = Vec::with_capacity(self.exprs.len());
        let mut lets = Vec::new();
        for (i, e) in self.exprs.iter().enumerate() {
            let r = |j: usize| text[j].clone();
            let s = match *e {
                ScalarExpr::Input(k) => format!("i{k}"),
                ScalarExpr::Const(c) => match c {
                    Scalar::Bool(b) => b.to_string(),
                    Scalar::I32(_) | Scalar::I64(_) => format!("{}", c.as_f64() as i64),
                    _ => format!("{:?}", c.as_f64()),
                },
                ScalarExpr::Unary(op, a) => format!("{}({})", op.name(), r(a)),
                ScalarExpr::Binary(op, a, b) => format!("{}({}, {})", op.name(), r(a), r(b)),
                ScalarExpr::Where(c, a, b) => format!("where({}, {}, {})", r(c), r(a), r(b)),
            };
            let named = uses[i] > 1 && !matches!(e, ScalarExpr::Input(_) | ScalarExpr::Const(_));
            if named {
                lets.push(format!("e{i}={s}"));
                text.push(format!("e{i}"));
            } else {
                text.push(s);
            }
        }
        lets.push(text.last().cloned().unwrap_or_default());
        let body = lets.join("; ");
        match &self.reduce {
            None => format!("fused{{{body}}}"),
            Some((op, axes, keepdims)) => {
                format!("fused{{{body}}}->{}{{axes={axes:?}{}}}", op.name(), if *keepdims { ",keepdims" } else { "" })
            }
        }
    }
}
