//! Tensors as raw bytes, for the backends that own memory (CPU buffers, device buffers): viewing a
//! tensor's elements as bytes and rebuilding a tensor from bytes a kernel wrote. Bools are one byte
//! each (0 or 1), every other dtype its native little-endian layout.

use kiln_ir::{DType, Tensor};
use std::borrow::Cow;

/// The bytes of a tensor's elements in row-major order (borrowed when it is in standard layout).
pub fn tensor_bytes(t: &Tensor) -> Cow<'_, [u8]> {
    if let Some(b) = standard_bytes(t) {
        return Cow::Borrowed(b);
    }
    let std = kiln_ir::map_array!(t, a => a.as_standard_layout().into_owned());
    Cow::Owned(standard_bytes(&std).expect("made standard").to_vec())
}

/// The bytes of a tensor in standard layout (`None` for other layouts).
pub fn standard_bytes(t: &Tensor) -> Option<&[u8]> {
    kiln_ir::with_array!(t, a => a.as_slice().map(|s| {
        // SAFETY: any initialized slice of plain numbers (or bools, one byte each) may be viewed as bytes.
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
    }))
}

/// A tensor of `dtype` and `shape` from the bytes of its elements (at least that many bytes).
pub fn tensor_from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Tensor {
    fn read<T: Copy>(bytes: &[u8], n: usize) -> Vec<T> {
        assert!(bytes.len() >= n * std::mem::size_of::<T>(), "too few bytes for the tensor");
        let mut v = Vec::<T>::with_capacity(n);
        // SAFETY: `bytes` holds at least `n` elements of `T` (asserted) written by the kernels; the
        // copy needs no alignment of the source.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>());
            v.set_len(n);
        }
        v
    }
    let n: usize = shape.iter().product();
    let s = ndarray::IxDyn(shape);
    let err = "buffer length matches the shape";
    match dtype {
        DType::F32 => Tensor::F32(ndarray::ArrayD::from_shape_vec(s, read::<f32>(bytes, n)).expect(err)),
        DType::F64 => Tensor::F64(ndarray::ArrayD::from_shape_vec(s, read::<f64>(bytes, n)).expect(err)),
        DType::I32 => Tensor::I32(ndarray::ArrayD::from_shape_vec(s, read::<i32>(bytes, n)).expect(err)),
        DType::I64 => Tensor::I64(ndarray::ArrayD::from_shape_vec(s, read::<i64>(bytes, n)).expect(err)),
        DType::Bool => {
            Tensor::Bool(ndarray::ArrayD::from_shape_vec(s, bytes[..n].iter().map(|&b| b != 0).collect()).expect(err))
        }
    }
}
