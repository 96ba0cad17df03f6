//! Scalar semantics in CUDA C: each elementwise op of a fused expression becomes an expression of
//! the AST, with the same results as the reference backend (NaN-propagating maximum and minimum,
//! sigmoid and softplus in their stable forms, wrapping integer arithmetic, saturating float to
//! integer casts). Ops that need more than one expression call a helper of the prelude; the
//! helpers a module uses are collected and printed once, in a fixed order.

use super::ast::*;
use kiln_ir::ops::{BinaryOp, Scalar, UnaryOp};
use kiln_ir::DType;
use std::collections::BTreeSet;

/// Prelude helpers, by (name, value type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Helper {
    Sigmoid(CTypeKey),
    Softplus(CTypeKey),
    Sign(CTypeKey),
    Max(CTypeKey),
    Min(CTypeKey),
    /// Whether the candidate (vb, ib) beats the current (va, ia) of an argmax.
    ArgMaxTake(CTypeKey),
}

/// A value type usable as an ordered key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CTypeKey {
    Float,
    Double,
    Int,
    LongLong,
}

impl CTypeKey {
    pub fn of(d: DType) -> CTypeKey {
        match d {
            DType::F32 => CTypeKey::Float,
            DType::F64 => CTypeKey::Double,
            DType::I32 => CTypeKey::Int,
            DType::I64 | DType::Bool => CTypeKey::LongLong,
        }
    }
    fn ctype(self) -> CType {
        match self {
            CTypeKey::Float => CType::Float,
            CTypeKey::Double => CType::Double,
            CTypeKey::Int => CType::Int,
            CTypeKey::LongLong => CType::LongLong,
        }
    }
}

/// A literal of the given dtype with value `v` (exact for every value the dtype holds).
pub fn literal(d: DType, v: f64) -> Expr {
    match d {
        DType::F32 => Expr::F32(v as f32),
        DType::F64 => Expr::F64(v),
        DType::I32 | DType::I64 => Expr::Int(v as i64),
        DType::Bool => Expr::Bool(v != 0.0),
    }
}

pub fn scalar_literal(c: Scalar) -> Expr {
    match c {
        Scalar::F32(v) => Expr::F32(v),
        Scalar::F64(v) => Expr::F64(v),
        Scalar::I32(v) => Expr::Int(v as i64),
        Scalar::I64(v) => Expr::Int(v),
        Scalar::Bool(b) => Expr::Bool(b),
    }
}

/// Math functions by float precision.
fn math(d: DType, f32_name: &'static str, f64_name: &'static str, args: Vec<Expr>) -> Expr {
    call(if d == DType::F64 { f64_name } else { f32_name }, args)
}

fn unsigned(d: DType) -> CType {
    if d == DType::I64 {
        CType::ULongLong
    } else {
        CType::UInt
    }
}

/// `a op b` with two's-complement wrapping, as the reference computes integers.
fn wrapping(op: BinOp, d: DType, a: Expr, b: Expr) -> Expr {
    cast(CType::of(d), bin(op, cast(unsigned(d), a), cast(unsigned(d), b)))
}

#[derive(Default)]
pub struct Scalars {
    pub used: BTreeSet<Helper>,
    /// Whether a tiled product runs on tensor cores (the prelude then holds `mma`'s helpers).
    pub tensor_cores: bool,
    /// The most slab buffers a tiled product fills by asynchronous copies (above 1, the prelude
    /// holds `tile_staging`'s helpers).
    pub async_copies: usize,
    /// Whether a tiled product's slices run as a thread block cluster (the prelude then holds
    /// `cluster`'s helpers).
    pub clusters: bool,
}

impl Scalars {
    fn helper(&mut self, h: Helper, name: &'static str, args: Vec<Expr>) -> Expr {
        self.used.insert(h);
        call(name, args)
    }

    /// `op(x)` where `x` has dtype `d`.
    pub fn unary(&mut self, op: UnaryOp, d: DType, x: Expr) -> Expr {
        use UnaryOp::*;
        let k = CTypeKey::of(d);
        let zero = literal(d, 0.0);
        if let Cast(to) = op {
            return match to {
                _ if to == d => x,
                DType::Bool => bin(BinOp::Ne, x, zero),
                _ => cast(CType::of(to), x),
            };
        }
        if d.is_int() {
            return match op {
                Neg => wrapping(BinOp::Sub, d, literal(d, 0.0), x),
                Abs => select(bin(BinOp::Lt, x.clone(), zero.clone()), wrapping(BinOp::Sub, d, zero, x.clone()), x),
                Sign => self.helper(Helper::Sign(k), "kiln_sign", vec![x]),
                Relu => select(bin(BinOp::Lt, x.clone(), zero.clone()), zero, x),
                _ => unreachable!("the type rule admits only neg/abs/sign/relu on integers"),
            };
        }
        match op {
            Neg => Expr::Neg(Box::new(x)),
            Not => Expr::Not(Box::new(x)),
            Exp => math(d, "expf", "exp", vec![x]),
            Log => math(d, "logf", "log", vec![x]),
            Log1p => math(d, "log1pf", "log1p", vec![x]),
            Expm1 => math(d, "expm1f", "expm1", vec![x]),
            Sqrt => math(d, "sqrtf", "sqrt", vec![x]),
            Rsqrt => literal(d, 1.0) / math(d, "sqrtf", "sqrt", vec![x]),
            Reciprocal => literal(d, 1.0) / x,
            Abs => math(d, "fabsf", "fabs", vec![x]),
            Sign => self.helper(Helper::Sign(k), "kiln_sign", vec![x]),
            Tanh => math(d, "tanhf", "tanh", vec![x]),
            Sigmoid => self.helper(Helper::Sigmoid(k), "kiln_sigmoid", vec![x]),
            Relu => select(bin(BinOp::Lt, x.clone(), zero.clone()), zero, x),
            Softplus => self.helper(Helper::Softplus(k), "kiln_softplus", vec![x]),
            Sin => math(d, "sinf", "sin", vec![x]),
            Cos => math(d, "cosf", "cos", vec![x]),
            Floor => math(d, "floorf", "floor", vec![x]),
            Ceil => math(d, "ceilf", "ceil", vec![x]),
            Cast(_) => unreachable!("handled above"),
        }
    }

    /// `op(a, b)` where both have dtype `d`.
    pub fn binary(&mut self, op: BinaryOp, d: DType, a: Expr, b: Expr) -> Expr {
        use BinaryOp::*;
        let k = CTypeKey::of(d);
        let int = d.is_int();
        match op {
            Add if int => wrapping(BinOp::Add, d, a, b),
            Sub if int => wrapping(BinOp::Sub, d, a, b),
            Mul if int => wrapping(BinOp::Mul, d, a, b),
            Add => a + b,
            Sub => a - b,
            Mul => a * b,
            Div => a / b,
            Pow => math(d, "powf", "pow", vec![a, b]),
            Maximum => self.helper(Helper::Max(k), "kiln_max", vec![a, b]),
            Minimum => self.helper(Helper::Min(k), "kiln_min", vec![a, b]),
            Eq => bin(BinOp::Eq, a, b),
            Ne => bin(BinOp::Ne, a, b),
            Lt => bin(BinOp::Lt, a, b),
            Le => bin(BinOp::Le, a, b),
            Gt => bin(BinOp::Gt, a, b),
            Ge => bin(BinOp::Ge, a, b),
            And => bin(BinOp::And, a, b),
            Or => bin(BinOp::Or, a, b),
        }
    }

    /// NaN-propagating maximum (reductions use it too).
    pub fn max(&mut self, d: DType, a: Expr, b: Expr) -> Expr {
        self.helper(Helper::Max(CTypeKey::of(d)), "kiln_max", vec![a, b])
    }
    pub fn min(&mut self, d: DType, a: Expr, b: Expr) -> Expr {
        self.helper(Helper::Min(CTypeKey::of(d)), "kiln_min", vec![a, b])
    }
    pub fn argmax_take(&mut self, d: DType, va: Expr, ia: Expr, vb: Expr, ib: Expr) -> Expr {
        self.helper(Helper::ArgMaxTake(CTypeKey::of(d)), "kiln_argmax_take", vec![va, ia, vb, ib])
    }

    /// The helpers used so far, as device functions.
    pub fn prelude(&self) -> Vec<DeviceFn> {
        let tensor_cores = if self.tensor_cores { super::mma::helpers() } else { vec![] };
        let copies = if self.async_copies > 1 { super::tile_staging::helpers(self.async_copies) } else { vec![] };
        let clusters = if self.clusters { super::cluster::helpers() } else { vec![] };
        self.used.iter().map(|&h| helper_fn(h)).chain(tensor_cores).chain(copies).chain(clusters).collect()
    }
}

fn is_nan(x: Expr) -> Expr {
    bin(BinOp::Ne, x.clone(), x)
}

fn helper_fn(h: Helper) -> DeviceFn {
    let (name, k) = match h {
        Helper::Sigmoid(k) => ("kiln_sigmoid", k),
        Helper::Softplus(k) => ("kiln_softplus", k),
        Helper::Sign(k) => ("kiln_sign", k),
        Helper::Max(k) => ("kiln_max", k),
        Helper::Min(k) => ("kiln_min", k),
        Helper::ArgMaxTake(k) => ("kiln_argmax_take", k),
    };
    let t = k.ctype();
    let d = match k {
        CTypeKey::Float => DType::F32,
        CTypeKey::Double => DType::F64,
        CTypeKey::Int => DType::I32,
        CTypeKey::LongLong => DType::I64,
    };
    let (x, a, b) = (var("x"), var("a"), var("b"));
    let (zero, one) = (literal(d, 0.0), literal(d, 1.0));
    let body_expr = match h {
        Helper::Sigmoid(_) => {
            // 1/(1+e^-x) for x >= 0, e^x/(1+e^x) below: never overflows.
            let e = math(d, "expf", "exp", vec![Expr::Neg(Box::new(math(d, "fabsf", "fabs", vec![x.clone()])))]);
            select(
                bin(BinOp::Ge, x.clone(), zero.clone()),
                one.clone() / (one.clone() + e.clone()),
                e.clone() / (one + e),
            )
        }
        Helper::Softplus(_) => {
            let e = math(d, "expf", "exp", vec![Expr::Neg(Box::new(math(d, "fabsf", "fabs", vec![x.clone()])))]);
            math(d, "fmaxf", "fmax", vec![x.clone(), zero.clone()]) + math(d, "log1pf", "log1p", vec![e])
        }
        Helper::Sign(_) => select(
            bin(BinOp::Gt, x.clone(), zero.clone()),
            one.clone(),
            select(bin(BinOp::Lt, x.clone(), zero.clone()), Expr::Neg(Box::new(one)), x.clone()),
        ),
        Helper::Max(_) | Helper::Min(_) => {
            let cmp = if matches!(h, Helper::Max(_)) { BinOp::Gt } else { BinOp::Lt };
            let pick = select(bin(cmp, a.clone(), b.clone()), a.clone(), b.clone());
            if d.is_float() {
                select(bin(BinOp::Or, is_nan(a.clone()), is_nan(b.clone())), a.clone() + b.clone(), pick)
            } else {
                pick
            }
        }
        Helper::ArgMaxTake(_) => {
            let (va, ia, vb, ib) = (var("va"), var("ia"), var("vb"), var("ib"));
            let ordered = bin(
                BinOp::Or,
                bin(BinOp::Gt, vb.clone(), va.clone()),
                bin(BinOp::And, bin(BinOp::Eq, vb.clone(), va.clone()), bin(BinOp::Lt, ib.clone(), ia.clone())),
            );
            if d.is_float() {
                // A NaN beats any number, and the first NaN wins (numpy's rule).
                let (na, nb) = (is_nan(va), is_nan(vb));
                select(
                    bin(BinOp::Or, na.clone(), nb.clone()),
                    bin(BinOp::And, nb, bin(BinOp::Or, Expr::Not(Box::new(na)), bin(BinOp::Lt, ib, ia))),
                    ordered,
                )
            } else {
                ordered
            }
        }
    };
    let (ret_ty, params): (CType, Vec<(CType, &'static str)>) = match h {
        Helper::Max(_) | Helper::Min(_) => (t, vec![(t, "a"), (t, "b")]),
        Helper::ArgMaxTake(_) => {
            (CType::Bool, vec![(t, "va"), (CType::LongLong, "ia"), (t, "vb"), (CType::LongLong, "ib")])
        }
        _ => (t, vec![(t, "x")]),
    };
    DeviceFn { ret: ret_ty, name, params, outputs: 0, body: vec![Stmt::ReturnValue(body_expr)] }
}
