//! Linear algebra: `matmul` with numpy semantics for operands of rank >= 2 (the last two axes are the
//! matrices, leading batch axes broadcast). Vectors go through the user API, which reshapes them.
//! Transposes are `Permute` (movement family). The reference uses ndarray's GEMM per batch item.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::Tensor;
use crate::types::{broadcast_shapes, DType, Dim, TensorType};
use ndarray::{Array3, ArrayD, Axis, Ix3, IxDyn};

pub fn infer_matmul(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if a.dtype != b.dtype {
        return Err(format!("operand dtypes differ ({} vs {})", a.dtype, b.dtype));
    }
    if a.dtype == DType::Bool {
        return Err("not defined for bool".into());
    }
    if a.rank() < 2 || b.rank() < 2 {
        return Err("operands must have rank >= 2 (reshape vectors to matrices)".into());
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (k1, k2) = (&a.shape[ra - 1], &b.shape[rb - 2]);
    if let (Dim::Fixed(x), Dim::Fixed(y)) = (k1, k2) {
        if x != y {
            return Err(format!("inner dimensions differ ({x} vs {y})"));
        }
    }
    let batch = broadcast_shapes(&a.shape[..ra - 2], &b.shape[..rb - 2]).ok_or("batch dimensions do not broadcast")?;
    let mut shape = batch;
    shape.push(a.shape[ra - 2].clone());
    shape.push(b.shape[rb - 1].clone());
    Ok(TensorType::new(a.dtype, shape))
}

/// Broadcasts `x` to `batch + [r, c]` and views it as `[prod(batch), r, c]`.
fn as_batches<T: Clone>(x: &ArrayD<T>, batch: &[usize]) -> Result<Array3<T>, String> {
    let r = x.ndim();
    let (rows, cols) = (x.shape()[r - 2], x.shape()[r - 1]);
    let mut full = batch.to_vec();
    full.extend([rows, cols]);
    let n: usize = batch.iter().product();
    let v = x.broadcast(IxDyn(&full)).ok_or("batch dimensions do not broadcast")?;
    let owned = v.as_standard_layout().into_owned();
    owned.into_shape_with_order((n, rows, cols)).map_err(|e| e.to_string())
}

fn batched<T: ndarray::LinalgScalar>(a: &ArrayD<T>, b: &ArrayD<T>, out_shape: &[usize]) -> Result<ArrayD<T>, String> {
    let r = out_shape.len();
    let batch = &out_shape[..r - 2];
    let (a3, b3) = (as_batches(a, batch)?, as_batches(b, batch)?);
    if a3.shape()[2] != b3.shape()[1] {
        return Err(format!("inner dimensions differ ({} vs {})", a3.shape()[2], b3.shape()[1]));
    }
    let mut out = Array3::<T>::zeros((a3.shape()[0], a3.shape()[1], b3.shape()[2]));
    for i in 0..a3.shape()[0] {
        let p = a3.index_axis(Axis(0), i).dot(&b3.index_axis(Axis(0), i));
        out.index_axis_mut(Axis(0), i).assign(&p);
    }
    let out = out.into_dimensionality::<Ix3>().map_err(|e| e.to_string())?;
    out.into_shape_with_order(IxDyn(out_shape)).map_err(|e| e.to_string())
}

pub fn eval_matmul(a: &Tensor, b: &Tensor, out: &TensorType) -> Result<Tensor, String> {
    let shape = out.concrete().ok_or("output shape is not concrete")?;
    match (a, b) {
        (Tensor::F32(x), Tensor::F32(y)) => Ok(Tensor::F32(batched(x, y, &shape)?)),
        (Tensor::F64(x), Tensor::F64(y)) => Ok(Tensor::F64(batched(x, y, &shape)?)),
        (Tensor::I32(x), Tensor::I32(y)) => Ok(Tensor::I32(batched(x, y, &shape)?)),
        (Tensor::I64(x), Tensor::I64(y)) => Ok(Tensor::I64(batched(x, y, &shape)?)),
        _ => Err("operand dtypes differ".into()),
    }
}

/// d(A B) = dA B + A dB, so dA = G B^T and dB = A^T G, summed over broadcast batch axes.
pub fn vjp_matmul(gr: &mut Graph, node: NodeId, g: NodeId) -> Result<Vec<Option<NodeId>>> {
    let (a, b) = (gr.inputs(node)[0], gr.inputs(node)[1]);
    let at = gr.node(node).at;
    if !gr.ty(node).dtype.is_float() {
        return Ok(vec![None, None]);
    }
    let bt = gr.transpose_last2(b, at)?;
    let da = gr.matmul(g, bt, at)?;
    let att = gr.transpose_last2(a, at)?;
    let db = gr.matmul(att, g, at)?;
    let (sa, sb) = (gr.ty(a).shape.clone(), gr.ty(b).shape.clone());
    Ok(vec![Some(gr.sum_to(da, &sa, at)?), Some(gr.sum_to(db, &sb, at)?)])
}
