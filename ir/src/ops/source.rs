//! Source ops: the leaves of a graph. Inputs are bound at call time, shared variables are values that
//! live between calls (owned by the user API, passed to a compiled program by id), constants are
//! embedded values. They have no operands and no gradient of their own.

use crate::tensor::Tensor;
use crate::types::TensorType;
use std::sync::Arc;

/// Identifies a shared variable across graphs (the user graph and every compiled copy of it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct SharedId(pub u32);

#[derive(Clone, Debug, PartialEq)]
pub enum SourceOp {
    Input { name: String, ty: TensorType },
    Shared { id: SharedId, name: String, ty: TensorType },
    Constant(Arc<Tensor>),
}

impl SourceOp {
    pub fn ty(&self) -> TensorType {
        match self {
            SourceOp::Input { ty, .. } | SourceOp::Shared { ty, .. } => ty.clone(),
            SourceOp::Constant(t) => t.ty(),
        }
    }
    pub fn eval(&self) -> Result<Tensor, String> {
        match self {
            SourceOp::Constant(t) => Ok((**t).clone()),
            SourceOp::Input { name, .. } => Err(format!("input '{name}' has no value bound")),
            SourceOp::Shared { name, .. } => Err(format!("shared variable '{name}' has no value bound")),
        }
    }
    pub fn label(&self) -> String {
        match self {
            SourceOp::Input { name, .. } => name.clone(),
            SourceOp::Shared { name, .. } => name.clone(),
            SourceOp::Constant(t) => constant_label(t),
        }
    }
}

/// A constant's printed form: its value when small, else its type.
fn constant_label(t: &Tensor) -> String {
    if t.len() == 1 {
        let v = t.item().expect("one element");
        match t.dtype() {
            crate::DType::Bool => format!("{}", v != 0.0),
            d if d.is_int() => format!("{}", v as i64),
            _ => format!("{v:?}"),
        }
    } else if t.len() <= 6 {
        let vals: Vec<String> = t.to_f64_vec().iter().map(|v| format!("{v}")).collect();
        format!("[{}]", vals.join(", "))
    } else {
        format!("constant{}", crate::types::shape_str(&t.ty().shape))
    }
}
