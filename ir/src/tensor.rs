//! `Tensor`, the runtime value of a node: an n-dimensional ndarray of one of kiln's dtypes. It is what
//! functions take and return, what constants and shared variables hold, and what the reference
//! semantics compute on.

use crate::types::{DType, Dim, TensorType};
use ndarray::{ArrayD, IxDyn};

#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I32(ArrayD<i32>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

/// Applies one expression to the array inside a tensor, whatever its dtype.
#[macro_export]
macro_rules! with_array {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::Tensor::F32($a) => $body,
            $crate::Tensor::F64($a) => $body,
            $crate::Tensor::I32($a) => $body,
            $crate::Tensor::I64($a) => $body,
            $crate::Tensor::Bool($a) => $body,
        }
    };
}

/// Like `with_array!`, rebuilding a tensor of the same dtype from the expression's array.
#[macro_export]
macro_rules! map_array {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::Tensor::F32($a) => $crate::Tensor::F32($body),
            $crate::Tensor::F64($a) => $crate::Tensor::F64($body),
            $crate::Tensor::I32($a) => $crate::Tensor::I32($body),
            $crate::Tensor::I64($a) => $crate::Tensor::I64($body),
            $crate::Tensor::Bool($a) => $crate::Tensor::Bool($body),
        }
    };
}

impl Tensor {
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::I32(_) => DType::I32,
            Tensor::I64(_) => DType::I64,
            Tensor::Bool(_) => DType::Bool,
        }
    }
    pub fn shape(&self) -> &[usize] {
        with_array!(self, a => a.shape())
    }
    pub fn len(&self) -> usize {
        with_array!(self, a => a.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype(), self.shape().iter().map(|&n| Dim::Fixed(n)).collect())
    }

    /// A tensor of the given dtype and shape filled with `value` (converted as `as` would).
    pub fn full(dtype: DType, shape: &[usize], value: f64) -> Tensor {
        let s = IxDyn(shape);
        match dtype {
            DType::F32 => Tensor::F32(ArrayD::from_elem(s, value as f32)),
            DType::F64 => Tensor::F64(ArrayD::from_elem(s, value)),
            DType::I32 => Tensor::I32(ArrayD::from_elem(s, value as i32)),
            DType::I64 => Tensor::I64(ArrayD::from_elem(s, value as i64)),
            DType::Bool => Tensor::Bool(ArrayD::from_elem(s, value != 0.0)),
        }
    }
    pub fn scalar(dtype: DType, value: f64) -> Tensor {
        Tensor::full(dtype, &[], value)
    }
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor::full(dtype, shape, 0.0)
    }

    /// Every element as f64 (bools as 0/1), in row-major order.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Tensor::F32(a) => a.iter().map(|&x| x as f64).collect(),
            Tensor::F64(a) => a.iter().copied().collect(),
            Tensor::I32(a) => a.iter().map(|&x| x as f64).collect(),
            Tensor::I64(a) => a.iter().map(|&x| x as f64).collect(),
            Tensor::Bool(a) => a.iter().map(|&x| x as u8 as f64).collect(),
        }
    }
    /// Every element as i64 (floats truncated), in row-major order.
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match self {
            Tensor::I32(a) => a.iter().map(|&x| x as i64).collect(),
            Tensor::I64(a) => a.iter().copied().collect(),
            _ => self.to_f64_vec().into_iter().map(|x| x as i64).collect(),
        }
    }
    /// Builds a tensor from f64 values, converting to `dtype`.
    pub fn from_f64(dtype: DType, shape: &[usize], values: &[f64]) -> Tensor {
        let s = IxDyn(shape);
        let err = "shape and value count agree";
        match dtype {
            DType::F32 => {
                Tensor::F32(ArrayD::from_shape_vec(s, values.iter().map(|&x| x as f32).collect()).expect(err))
            }
            DType::F64 => Tensor::F64(ArrayD::from_shape_vec(s, values.to_vec()).expect(err)),
            DType::I32 => {
                Tensor::I32(ArrayD::from_shape_vec(s, values.iter().map(|&x| x as i32).collect()).expect(err))
            }
            DType::I64 => {
                Tensor::I64(ArrayD::from_shape_vec(s, values.iter().map(|&x| x as i64).collect()).expect(err))
            }
            DType::Bool => {
                Tensor::Bool(ArrayD::from_shape_vec(s, values.iter().map(|&x| x != 0.0).collect()).expect(err))
            }
        }
    }
    /// The single element of a tensor with one element, as f64.
    pub fn item(&self) -> Option<f64> {
        (self.len() == 1).then(|| self.to_f64_vec()[0])
    }
    /// Converts to another dtype (numpy's `astype`: floats to ints truncate, nonzero is true).
    pub fn cast(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        match (self, dtype) {
            (Tensor::I64(a), DType::I32) => Tensor::I32(a.mapv(|x| x as i32)),
            (Tensor::I32(a), DType::I64) => Tensor::I64(a.mapv(|x| x as i64)),
            (Tensor::I64(a), DType::Bool) => Tensor::Bool(a.mapv(|x| x != 0)),
            _ => Tensor::from_f64(dtype, self.shape(), &self.to_f64_vec()),
        }
    }
    /// The largest absolute difference to another tensor of the same shape, as f64 (NaN if either has
    /// a NaN where the other has not; used by tests and backend comparisons).
    pub fn max_abs_diff(&self, other: &Tensor) -> f64 {
        let (a, b) = (self.to_f64_vec(), other.to_f64_vec());
        a.iter()
            .zip(&b)
            .map(|(x, y)| if x == y || (x.is_nan() && y.is_nan()) { 0.0 } else { (x - y).abs() })
            .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m })
    }
    /// Whether two tensors agree elementwise within `atol + rtol * |b|` (NaNs must match).
    pub fn allclose(&self, other: &Tensor, rtol: f64, atol: f64) -> bool {
        if self.shape() != other.shape() {
            return false;
        }
        self.to_f64_vec()
            .iter()
            .zip(other.to_f64_vec())
            .all(|(&x, y)| x == y || (x.is_nan() && y.is_nan()) || (x - y).abs() <= atol + rtol * y.abs())
    }
    pub fn into_shape(self, shape: &[usize]) -> Option<Tensor> {
        let s = IxDyn(shape);
        Some(map_array!(self, a => a.as_standard_layout().into_owned().into_shape_with_order(s.clone()).ok()?))
    }
}

macro_rules! tensor_from {
    ($t:ty, $v:ident) => {
        impl<D: ndarray::Dimension> From<ndarray::Array<$t, D>> for Tensor {
            fn from(a: ndarray::Array<$t, D>) -> Tensor {
                Tensor::$v(a.into_dyn())
            }
        }
        impl From<$t> for Tensor {
            fn from(x: $t) -> Tensor {
                Tensor::$v(ndarray::arr0(x).into_dyn())
            }
        }
        impl TryFrom<Tensor> for ArrayD<$t> {
            type Error = crate::Error;
            fn try_from(t: Tensor) -> crate::Result<ArrayD<$t>> {
                match t {
                    Tensor::$v(a) => Ok(a),
                    other => Err(crate::Error::Invalid(format!(
                        "expected a tensor of {}, got {}",
                        stringify!($t),
                        other.ty()
                    ))),
                }
            }
        }
    };
}
tensor_from!(f32, F32);
tensor_from!(f64, F64);
tensor_from!(i32, I32);
tensor_from!(i64, I64);
tensor_from!(bool, Bool);
