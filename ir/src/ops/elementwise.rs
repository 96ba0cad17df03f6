//! Elementwise ops: unary math, binary arithmetic and comparisons with numpy broadcasting, logic, and
//! `where`. The scalar semantics here (`unary_scalar`, `binary_scalar`) are the single definition of
//! what each op computes: the reference evaluation of plain nodes and of fused kernels both use them,
//! so fusing never changes a result. Binary operands must share a dtype (scalars written as Rust
//! numbers take the other operand's dtype in the user API); mixing is an error, never a silent upcast.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::Tensor;
use crate::types::{broadcast_shapes, DType, TensorType};
use num_traits::Float;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Log1p,
    Expm1,
    Sqrt,
    Rsqrt,
    Reciprocal,
    Abs,
    Sign,
    Tanh,
    Sigmoid,
    Relu,
    Softplus,
    Sin,
    Cos,
    Floor,
    Ceil,
    Not,
    Cast(DType),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Maximum,
    Minimum,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl UnaryOp {
    pub fn name(self) -> String {
        use UnaryOp::*;
        let s = match self {
            Neg => "neg",
            Exp => "exp",
            Log => "log",
            Log1p => "log1p",
            Expm1 => "expm1",
            Sqrt => "sqrt",
            Rsqrt => "rsqrt",
            Reciprocal => "reciprocal",
            Abs => "abs",
            Sign => "sign",
            Tanh => "tanh",
            Sigmoid => "sigmoid",
            Relu => "relu",
            Softplus => "softplus",
            Sin => "sin",
            Cos => "cos",
            Floor => "floor",
            Ceil => "ceil",
            Not => "not",
            Cast(d) => return format!("cast<{d}>"),
        };
        s.to_string()
    }
    /// Every unary op, for tables and tests.
    pub const ALL: [UnaryOp; 19] = {
        use UnaryOp::*;
        [
            Neg, Exp, Log, Log1p, Expm1, Sqrt, Rsqrt, Reciprocal, Abs, Sign, Tanh, Sigmoid, Relu, Softplus, Sin, Cos,
            Floor, Ceil, Not,
        ]
    };
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        use BinaryOp::*;
        match self {
            Add => "add",
            Sub => "sub",
            Mul => "mul",
            Div => "div",
            Pow => "pow",
            Maximum => "maximum",
            Minimum => "minimum",
            Eq => "eq",
            Ne => "ne",
            Lt => "lt",
            Le => "le",
            Gt => "gt",
            Ge => "ge",
            And => "and",
            Or => "or",
        }
    }
    pub fn is_comparison(self) -> bool {
        use BinaryOp::*;
        matches!(self, Eq | Ne | Lt | Le | Gt | Ge)
    }
    pub fn is_logical(self) -> bool {
        matches!(self, BinaryOp::And | BinaryOp::Or)
    }
    pub const ALL: [BinaryOp; 15] = {
        use BinaryOp::*;
        [Add, Sub, Mul, Div, Pow, Maximum, Minimum, Eq, Ne, Lt, Le, Gt, Ge, And, Or]
    };
}

/// One element of a tensor of any dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    F32(f32),
    F64(f64),
    I32(i32),
    I64(i64),
    Bool(bool),
}

macro_rules! scalar_from {
    ($t:ty, $v:ident) => {
        impl From<$t> for Scalar {
            fn from(x: $t) -> Scalar {
                Scalar::$v(x)
            }
        }
    };
}
scalar_from!(f32, F32);
scalar_from!(f64, F64);
scalar_from!(i32, I32);
scalar_from!(i64, I64);
scalar_from!(bool, Bool);

impl Scalar {
    pub fn dtype(self) -> DType {
        match self {
            Scalar::F32(_) => DType::F32,
            Scalar::F64(_) => DType::F64,
            Scalar::I32(_) => DType::I32,
            Scalar::I64(_) => DType::I64,
            Scalar::Bool(_) => DType::Bool,
        }
    }
    pub fn as_f64(self) -> f64 {
        match self {
            Scalar::F32(x) => x as f64,
            Scalar::F64(x) => x,
            Scalar::I32(x) => x as f64,
            Scalar::I64(x) => x as f64,
            Scalar::Bool(x) => x as u8 as f64,
        }
    }
    pub fn from_f64(dtype: DType, v: f64) -> Scalar {
        match dtype {
            DType::F32 => Scalar::F32(v as f32),
            DType::F64 => Scalar::F64(v),
            DType::I32 => Scalar::I32(v as i32),
            DType::I64 => Scalar::I64(v as i64),
            DType::Bool => Scalar::Bool(v != 0.0),
        }
    }
    fn cast(self, dtype: DType) -> Scalar {
        match (self, dtype) {
            (Scalar::I64(x), DType::I32) => Scalar::I32(x as i32),
            (Scalar::I64(x), DType::I64) => Scalar::I64(x),
            (Scalar::I32(x), DType::I64) => Scalar::I64(x as i64),
            (s, d) => Scalar::from_f64(d, s.as_f64()),
        }
    }
}

/// The float semantics of each unary op, in the operand's own precision, written in the numerically
/// stable form (sigmoid and softplus never overflow).
pub fn unary_float<F: Float>(op: UnaryOp, x: F) -> F {
    use UnaryOp::*;
    let (zero, one) = (F::zero(), F::one());
    match op {
        Neg => -x,
        Exp => x.exp(),
        Log => x.ln(),
        Log1p => x.ln_1p(),
        Expm1 => x.exp_m1(),
        Sqrt => x.sqrt(),
        Rsqrt => one / x.sqrt(),
        Reciprocal => one / x,
        Abs => x.abs(),
        Sign => {
            if x > zero {
                one
            } else if x < zero {
                -one
            } else {
                x // 0, -0 and NaN stay as they are
            }
        }
        Tanh => x.tanh(),
        Sigmoid => {
            if x >= zero {
                one / (one + (-x).exp())
            } else {
                let e = x.exp();
                e / (one + e)
            }
        }
        Relu => {
            if x < zero {
                zero
            } else {
                x
            }
        }
        Softplus => x.max(zero) + (-x.abs()).exp().ln_1p(),
        Sin => x.sin(),
        Cos => x.cos(),
        Floor => x.floor(),
        Ceil => x.ceil(),
        Not | Cast(_) => unreachable!("not a float op"),
    }
}

fn unary_int<I: num_traits::PrimInt + num_traits::Signed + num_traits::WrappingNeg>(op: UnaryOp, x: I) -> I {
    match op {
        UnaryOp::Neg => x.wrapping_neg(),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sign => x.signum(),
        UnaryOp::Relu => x.max(I::zero()),
        _ => unreachable!("type rule admits only neg/abs/sign/relu on ints"),
    }
}

/// The value of a unary op on one element (the operand already checked by `infer_unary`).
pub fn unary_scalar(op: UnaryOp, x: Scalar) -> Scalar {
    match (op, x) {
        (UnaryOp::Cast(d), s) => s.cast(d),
        (UnaryOp::Not, Scalar::Bool(b)) => Scalar::Bool(!b),
        (_, Scalar::F32(v)) => Scalar::F32(unary_float(op, v)),
        (_, Scalar::F64(v)) => Scalar::F64(unary_float(op, v)),
        (_, Scalar::I32(v)) => Scalar::I32(unary_int(op, v)),
        (_, Scalar::I64(v)) => Scalar::I64(unary_int(op, v)),
        (_, Scalar::Bool(_)) => unreachable!("type rule rejects math on bool"),
    }
}

fn arith_float<F: Float>(op: BinaryOp, a: F, b: F) -> F {
    use BinaryOp::*;
    match op {
        Add => a + b,
        Sub => a - b,
        Mul => a * b,
        Div => a / b,
        Pow => a.powf(b),
        // NaN-propagating, as numpy's maximum/minimum.
        Maximum => {
            if a.is_nan() || b.is_nan() {
                F::nan()
            } else {
                a.max(b)
            }
        }
        Minimum => {
            if a.is_nan() || b.is_nan() {
                F::nan()
            } else {
                a.min(b)
            }
        }
        _ => unreachable!("not arithmetic"),
    }
}

fn arith_int<I: num_traits::PrimInt + num_traits::WrappingAdd + num_traits::WrappingSub + num_traits::WrappingMul>(
    op: BinaryOp,
    a: I,
    b: I,
) -> I {
    match op {
        BinaryOp::Add => a.wrapping_add(&b),
        BinaryOp::Sub => a.wrapping_sub(&b),
        BinaryOp::Mul => a.wrapping_mul(&b),
        BinaryOp::Maximum => a.max(b),
        BinaryOp::Minimum => a.min(b),
        _ => unreachable!("type rule admits only add/sub/mul/maximum/minimum on ints"),
    }
}

fn compare<T: PartialOrd>(op: BinaryOp, a: T, b: T) -> bool {
    use BinaryOp::*;
    match op {
        Eq => a == b,
        Ne => a != b,
        Lt => a < b,
        Le => a <= b,
        Gt => a > b,
        Ge => a >= b,
        _ => unreachable!("not a comparison"),
    }
}

/// The value of a binary op on two elements of the same dtype.
pub fn binary_scalar(op: BinaryOp, a: Scalar, b: Scalar) -> Scalar {
    use Scalar::*;
    if op.is_comparison() {
        return Bool(match (a, b) {
            (F32(x), F32(y)) => compare(op, x, y),
            (F64(x), F64(y)) => compare(op, x, y),
            (I32(x), I32(y)) => compare(op, x, y),
            (I64(x), I64(y)) => compare(op, x, y),
            (Bool(x), Bool(y)) => compare(op, x, y),
            _ => unreachable!("type rule requires equal dtypes"),
        });
    }
    match (a, b) {
        (Bool(x), Bool(y)) => Bool(if op == BinaryOp::And { x && y } else { x || y }),
        (F32(x), F32(y)) => F32(arith_float(op, x, y)),
        (F64(x), F64(y)) => F64(arith_float(op, x, y)),
        (I32(x), I32(y)) => I32(arith_int(op, x, y)),
        (I64(x), I64(y)) => I64(arith_int(op, x, y)),
        _ => unreachable!("type rule requires equal dtypes"),
    }
}

pub fn infer_unary(op: UnaryOp, x: &TensorType) -> Result<TensorType, String> {
    use UnaryOp::*;
    let d = x.dtype;
    let ok = match op {
        Cast(_) => true,
        Not => d == DType::Bool,
        Neg | Abs | Sign | Relu => d.is_float() || d.is_int(),
        _ => d.is_float(),
    };
    if !ok {
        let want = match op {
            Not => "bool",
            Neg | Abs | Sign | Relu => "a float or integer dtype",
            _ => "a float dtype (cast integers first)",
        };
        return Err(format!("needs {want}, got {d}"));
    }
    Ok(match op {
        Cast(to) => x.with_dtype(to),
        _ => x.clone(),
    })
}

pub fn infer_binary(op: BinaryOp, a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    use BinaryOp::*;
    if a.dtype != b.dtype {
        return Err(format!("operand dtypes differ ({} vs {}); cast one explicitly", a.dtype, b.dtype));
    }
    let d = a.dtype;
    let ok = match op {
        And | Or => d == DType::Bool,
        Eq | Ne => true,
        Lt | Le | Gt | Ge => d != DType::Bool,
        Div | Pow => d.is_float(),
        Add | Sub | Mul | Maximum | Minimum => d != DType::Bool,
    };
    if !ok {
        return Err(format!("not defined for {d}"));
    }
    let shape = broadcast_shapes(&a.shape, &b.shape).ok_or_else(|| "shapes do not broadcast".to_string())?;
    let dtype = if op.is_comparison() { DType::Bool } else { d };
    Ok(TensorType::new(dtype, shape))
}

pub fn infer_where(c: &TensorType, a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if c.dtype != DType::Bool {
        return Err(format!("condition must be bool, got {}", c.dtype));
    }
    if a.dtype != b.dtype {
        return Err(format!("branch dtypes differ ({} vs {})", a.dtype, b.dtype));
    }
    let s = broadcast_shapes(&c.shape, &a.shape).and_then(|s| broadcast_shapes(&s, &b.shape));
    Ok(TensorType::new(a.dtype, s.ok_or("shapes do not broadcast")?))
}

/// Every operand broadcast to `shape`, as scalars in row-major order.
pub fn broadcast_scalars(t: &Tensor, shape: &[usize]) -> Result<Vec<Scalar>, String> {
    crate::with_array!(t, a => a
        .broadcast(ndarray::IxDyn(shape))
        .map(|v| v.iter().map(|&x| Scalar::from(x)).collect())
        .ok_or_else(|| format!("cannot broadcast {:?} to {shape:?}", a.shape())))
}

/// Builds a tensor of `dtype` and `shape` from scalars of that dtype.
pub fn tensor_from_scalars(dtype: DType, shape: &[usize], v: Vec<Scalar>) -> Tensor {
    let s = ndarray::IxDyn(shape);
    macro_rules! build {
        ($variant:ident) => {
            Tensor::$variant(
                ndarray::ArrayD::from_shape_vec(
                    s,
                    v.into_iter()
                        .map(|x| if let Scalar::$variant(y) = x { y } else { unreachable!("dtype checked") })
                        .collect(),
                )
                .expect("element count matches shape"),
            )
        };
    }
    match dtype {
        DType::F32 => build!(F32),
        DType::F64 => build!(F64),
        DType::I32 => build!(I32),
        DType::I64 => build!(I64),
        DType::Bool => build!(Bool),
    }
}

/// Evaluates an elementwise function of broadcast operands (the shared core of every elementwise op
/// and of fused kernels).
pub fn eval_map(inputs: &[&Tensor], out: &TensorType, f: impl Fn(&[Scalar]) -> Scalar) -> Result<Tensor, String> {
    let shape = out.concrete().ok_or("output shape is not concrete")?;
    let cols: Vec<Vec<Scalar>> = inputs.iter().map(|t| broadcast_scalars(t, &shape)).collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let mut args = vec![Scalar::Bool(false); inputs.len()];
    let mut vals = Vec::with_capacity(n);
    for i in 0..n {
        for (a, c) in args.iter_mut().zip(&cols) {
            *a = c[i];
        }
        vals.push(f(&args));
    }
    Ok(tensor_from_scalars(out.dtype, &shape, vals))
}

pub fn eval_unary(op: UnaryOp, x: &Tensor, out: &TensorType) -> Result<Tensor, String> {
    eval_map(&[x], out, |a| unary_scalar(op, a[0]))
}
pub fn eval_binary(op: BinaryOp, a: &Tensor, b: &Tensor, out: &TensorType) -> Result<Tensor, String> {
    eval_map(&[a, b], out, |v| binary_scalar(op, v[0], v[1]))
}
pub fn eval_where(inputs: &[&Tensor], out: &TensorType) -> Result<Tensor, String> {
    eval_map(inputs, out, |v| if v[0] == Scalar::Bool(true) { v[1] } else { v[2] })
}

/// A tensor of zeros shaped like node `like`.
pub fn zeros_like(graph: &mut Graph, like: NodeId, at: crate::Loc) -> Result<NodeId> {
    let z = graph.scalar_like(like, 0.0, at);
    let shape = graph.ty(like).shape.clone();
    graph.broadcast_to(z, &shape, at)
}

pub fn vjp_unary(op: UnaryOp, gr: &mut Graph, node: NodeId, g: NodeId) -> Result<Vec<Option<NodeId>>> {
    use UnaryOp::*;
    let x = gr.inputs(node)[0];
    let at = gr.node(node).at;
    let xd = gr.ty(x).dtype;
    if !xd.is_float() || !gr.ty(node).dtype.is_float() {
        return Ok(vec![None]);
    }
    let y = node;
    let dx = match op {
        Neg => gr.neg(g, at)?,
        Exp => gr.mul2(g, y, at)?,
        Log => gr.div2(g, x, at)?,
        Log1p => {
            let one = gr.scalar_like(x, 1.0, at);
            let d = gr.add2(x, one, at)?;
            gr.div2(g, d, at)?
        }
        Expm1 => {
            let one = gr.scalar_like(x, 1.0, at);
            let d = gr.add2(y, one, at)?;
            gr.mul2(g, d, at)?
        }
        // d sqrt(x) = 1 / (2 sqrt(x))
        Sqrt => {
            let d = gr.div2(g, y, at)?;
            gr.scale(d, 0.5, at)?
        }
        // d x^-1/2 = -1/2 x^-3/2 = -1/2 * y / x
        Rsqrt => {
            let d = gr.div2(y, x, at)?;
            let d = gr.mul2(g, d, at)?;
            gr.scale(d, -0.5, at)?
        }
        // d 1/x = -1/x^2 = -y^2
        Reciprocal => {
            let yy = gr.mul2(y, y, at)?;
            let d = gr.mul2(g, yy, at)?;
            gr.neg(d, at)?
        }
        Abs => {
            let s = gr.unary(Sign, x, at)?;
            gr.mul2(g, s, at)?
        }
        Sign | Floor | Ceil => zeros_like(gr, x, at)?,
        // d tanh = 1 - y^2
        Tanh => {
            let yy = gr.mul2(y, y, at)?;
            let one = gr.scalar_like(x, 1.0, at);
            let d = gr.sub2(one, yy, at)?;
            gr.mul2(g, d, at)?
        }
        // d sigmoid = y (1 - y)
        Sigmoid => {
            let one = gr.scalar_like(x, 1.0, at);
            let om = gr.sub2(one, y, at)?;
            let d = gr.mul2(y, om, at)?;
            gr.mul2(g, d, at)?
        }
        // Masked where the output is positive (relu(x) > 0 exactly where x > 0, NaN included),
        // as PyTorch's threshold_backward: the pre-activation is then not kept for the backward
        // pass, and a fused bias add + relu writes one tensor instead of two.
        Relu => {
            let zero = gr.scalar_like(x, 0.0, at);
            let pos = gr.binary(BinaryOp::Gt, y, zero, at)?;
            gr.where_(pos, g, zero, at)?
        }
        // d softplus = sigmoid
        Softplus => {
            let s = gr.unary(Sigmoid, x, at)?;
            gr.mul2(g, s, at)?
        }
        Sin => {
            let c = gr.unary(Cos, x, at)?;
            gr.mul2(g, c, at)?
        }
        Cos => {
            let s = gr.unary(Sin, x, at)?;
            let d = gr.mul2(g, s, at)?;
            gr.neg(d, at)?
        }
        Cast(_) => gr.cast(g, xd, at)?,
        Not => return Ok(vec![None]),
    };
    Ok(vec![Some(dx)])
}

pub fn vjp_binary(op: BinaryOp, gr: &mut Graph, node: NodeId, g: NodeId) -> Result<Vec<Option<NodeId>>> {
    use BinaryOp::*;
    let (a, b) = (gr.inputs(node)[0], gr.inputs(node)[1]);
    let at = gr.node(node).at;
    if !gr.ty(node).dtype.is_float() {
        return Ok(vec![None, None]);
    }
    let (da, db) = match op {
        Add => (g, g),
        Sub => (g, gr.neg(g, at)?),
        Mul => (gr.mul2(g, b, at)?, gr.mul2(g, a, at)?),
        // d(a/b)/db = -a/b^2 = -y/b
        Div => {
            let da = gr.div2(g, b, at)?;
            let t = gr.div2(node, b, at)?;
            let t = gr.mul2(g, t, at)?;
            (da, gr.neg(t, at)?)
        }
        // d a^b = b a^(b-1) da + ln(a) a^b db
        Pow => {
            let one = gr.scalar_like(a, 1.0, at);
            let bm1 = gr.sub2(b, one, at)?;
            let p = gr.binary(Pow, a, bm1, at)?;
            let t = gr.mul2(b, p, at)?;
            let da = gr.mul2(g, t, at)?;
            let la = gr.unary(UnaryOp::Log, a, at)?;
            let t = gr.mul2(la, node, at)?;
            (da, gr.mul2(g, t, at)?)
        }
        // The gradient goes to the chosen operand; ties go to the first.
        Maximum | Minimum => {
            let pick_a = gr.binary(if op == Maximum { Ge } else { Le }, a, b, at)?;
            let zero = gr.scalar_like(g, 0.0, at);
            (gr.where_(pick_a, g, zero, at)?, gr.where_(pick_a, zero, g, at)?)
        }
        Eq | Ne | Lt | Le | Gt | Ge | And | Or => return Ok(vec![None, None]),
    };
    let (sa, sb) = (gr.ty(a).shape.clone(), gr.ty(b).shape.clone());
    Ok(vec![Some(gr.sum_to(da, &sa, at)?), Some(gr.sum_to(db, &sb, at)?)])
}

pub fn vjp_where(gr: &mut Graph, node: NodeId, g: NodeId) -> Result<Vec<Option<NodeId>>> {
    let ins = gr.inputs(node).to_vec();
    let at = gr.node(node).at;
    if !gr.ty(node).dtype.is_float() {
        return Ok(vec![None, None, None]);
    }
    let zero = gr.scalar_like(g, 0.0, at);
    let da = gr.where_(ins[0], g, zero, at)?;
    let db = gr.where_(ins[0], zero, g, at)?;
    let (sa, sb) = (gr.ty(ins[1]).shape.clone(), gr.ty(ins[2]).shape.clone());
    Ok(vec![None, Some(gr.sum_to(da, &sa, at)?), Some(gr.sum_to(db, &sb, at)?)])
}
