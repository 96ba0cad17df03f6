//! Bad input gets a clear `Err` — which input or op, what was expected, what came, and the line of
//! user code — never a panic.

use kiln::prelude::*;
use kiln::Error;

#[test]
fn ill_shaped_matmul_names_both_shapes_and_the_line() {
    let g = Graph::new();
    let a = g.input("a", F32, [3, 4]);
    let b = g.input("b", F32, [5, 6]);
    let line = line!() + 1;
    let c = a.matmul(&b);
    let err = c.check().unwrap_err().to_string();
    assert!(err.contains("f32[3,4]") && err.contains("f32[5,6]"), "{err}");
    assert!(err.contains(&format!("tests/errors.rs:{line}")), "{err}");
    assert!(err.contains("inner dimensions differ (4 vs 5)"), "{err}");
    // the error travels through later ops and stops compile
    let d = (&c + 1.0).tanh().sum_all();
    assert_eq!(d.check().unwrap_err().to_string(), err);
    let e = g.function([&a, &b], [&d]).compile(Device::Reference).err().unwrap().to_string();
    assert_eq!(e, err);
}

#[test]
fn broadcasting_and_dtype_mismatches() {
    let g = Graph::new();
    let a = g.input("a", F32, [2, 3]);
    let b = g.input("b", F32, [4]);
    let i = g.input("i", I64, [2, 3]);
    let line = line!() + 1;
    let e = (&a + &b).check().unwrap_err().to_string();
    assert!(e.contains("shapes do not broadcast (operands: f32[2,3], f32[4])"), "{e}");
    assert!(e.contains(&format!("errors.rs:{line}")), "{e}");
    let e = (&a * &i).check().unwrap_err().to_string();
    assert!(e.contains("dtypes differ (f32 vs i64)"), "{e}");
    let e = i.exp().check().unwrap_err().to_string();
    assert!(e.contains("exp") && e.contains("needs a float dtype"), "{e}");
    let e = a.reshape(&[4, -1]).check().unwrap_err().to_string();
    assert!(e.contains("cannot reshape 6 elements"), "{e}");
    let e = a.sum(&[2]).check().unwrap_err().to_string();
    assert!(e.contains("axis 2 out of range for rank 2"), "{e}");
    let e = a.permute(&[0, 0]).check().unwrap_err().to_string();
    assert!(e.contains("not a permutation"), "{e}");
    let e = a.take(&a, 0).check().unwrap_err().to_string();
    assert!(e.contains("indices must be integers"), "{e}");
}

#[test]
fn call_with_wrong_shape_dtype_or_count_names_the_input() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 3.into()]);
    let y = g.input("y", F32, [Dim::sym("batch")]);
    let out = x.sum(&[1]) + &y;
    let mut f = g.function([&x, &y], [&out]).compile(Device::Reference).unwrap();
    let good_y: Tensor = Array1::<f32>::zeros(2).into();
    let e = f.call(&[Array2::<f32>::zeros((2, 4)).into(), good_y.clone()]).unwrap_err();
    assert!(matches!(&e, Error::Call { input, .. } if input == "x"), "{e}");
    assert!(e.to_string().contains("declared f32[batch,3], got shape [2, 4]"), "{e}");
    let e = f.call(&[Array2::<f64>::zeros((2, 3)).into(), good_y.clone()]).unwrap_err();
    assert!(e.to_string().contains("input 'x': expected dtype f32, got f64"), "{e}");
    let e = f.call(&[Array1::<f32>::zeros(3).into(), good_y.clone()]).unwrap_err();
    assert!(e.to_string().contains("expected rank 2, got rank 1"), "{e}");
    // symbolic sizes must agree across inputs
    let e = f.call(&[Array2::<f32>::zeros((2, 3)).into(), Array1::<f32>::zeros(5).into()]).unwrap_err();
    assert!(e.to_string().contains("input 'y'") && e.to_string().contains("'batch' is 2 elsewhere but 5 here"), "{e}");
    let e = f.call(&[good_y]).unwrap_err();
    assert!(e.to_string().contains("expected 2 arguments (x, y), got 1"), "{e}");
}

#[test]
fn runtime_index_errors_are_errors() {
    let g = Graph::new();
    let x = g.input("x", F32, [3]);
    let i = g.input("i", I64, [2]);
    let line = line!() + 1;
    let t = x.take(&i, 0);
    let mut f = g.function([&x, &i], [&t]).compile(Device::Reference).unwrap();
    let e = f.call(&[array![1f32, 2., 3.].into(), array![0i64, 3].into()]).unwrap_err().to_string();
    assert!(e.contains("index 3 out of range for an axis of size 3"), "{e}");
    assert!(e.contains(&format!("errors.rs:{line}")), "{e}");
    assert_eq!(
        f.call(&[array![1f32, 2., 3.].into(), array![-1i64, 0].into()]).unwrap()[0],
        Tensor::from(array![3f32, 1.])
    );
}

#[test]
fn symbolic_sizes_that_disagree_at_run_time() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n")]);
    let y = g.input("y", F32, [Dim::sym("m")]);
    let line = line!() + 1;
    let s = &x + &y;
    let mut f = g.function([&x, &y], [&s]).compile(Device::Reference).unwrap();
    let e = f.call(&[Array1::<f32>::zeros(2).into(), Array1::<f32>::zeros(3).into()]).unwrap_err().to_string();
    assert!(e.contains(&format!("errors.rs:{line}")) && e.contains("do not broadcast"), "{e}");
}

#[test]
fn gradient_errors() {
    let g = Graph::new();
    let x = g.input("x", F32, [3]);
    let w = g.shared("w", array![1f32, 2., 3.]);
    let unused = g.shared("unused", array![1f32]);
    let k = g.input("k", I64, [3]);
    let e = g.grad(&(&x * &w), [&w]).unwrap_err().to_string();
    assert!(e.contains("the cost must be a float scalar, got f32[3]"), "{e}");
    let e = g.grad(&(&x * &w).sum_all(), [&k]).unwrap_err().to_string();
    assert!(e.contains("'k' has dtype i64"), "{e}");
    let e = g.grad(&(&x * &w).sum_all(), [&unused]).unwrap_err().to_string();
    assert!(e.contains("no gradient for 'unused': the cost does not depend on it"), "{e}");
    // only through a comparison: not silently zero
    let through_cmp = w.gt(1.0).cast(F32).sum_all();
    let e = g.grad(&through_cmp, [&w]).unwrap_err().to_string();
    assert!(
        e.contains("no gradient for 'w': the cost reaches it only through a non-differentiable value (gt at"),
        "{e}"
    );
    // unless asked for
    let z = g.grad_with(&through_cmp, &[&w], Disconnected::Zero).unwrap();
    let mut f = g.function([], [&z[0]]).compile(Device::Reference).unwrap();
    assert_eq!(f.call1(&[]).unwrap(), Tensor::from(array![0f32, 0., 0.]));
}

#[test]
fn function_misuse() {
    let g = Graph::new();
    let x = g.input("x", F32, [3]);
    let y = g.input("y", F32, [3]);
    let w = g.shared("w", array![1f32, 2., 3.]);
    let e = g.function([&x], [&(&x + &y)]).compile(Device::Reference).err().unwrap().to_string();
    assert!(e.contains("depend on input 'y', which is not among the function's inputs"), "{e}");
    let e = g.function([&x], [&x]).updates([(&x, &x + 1.0)]).compile(Device::Reference).err().unwrap().to_string();
    assert!(e.contains("only shared variables can be updated"), "{e}");
    let e = g.function([&x], [&x]).updates([(&w, x.sum_all())]).compile(Device::Reference).err().unwrap().to_string();
    assert!(e.contains("the update of 'w' is f32[], but 'w' is f32[3]"), "{e}");
    let e = w.set_value(array![1.0f64, 2., 3.]).unwrap_err().to_string();
    assert!(e.contains("is f32[3], cannot set a f64[3]"), "{e}");
    let other = Graph::new();
    let z = other.input("z", F32, [3]);
    let e = (&x + &z).check().unwrap_err().to_string();
    assert!(e.contains("different graphs"), "{e}");
}

#[test]
fn a_call_that_fails_leaves_variables_untouched() {
    // The update of `w` is written in place on the CPU backend; a bad index in the same call must
    // fail before it is.
    let g = Graph::new();
    let i = g.input("i", I64, [2]);
    let table = g.shared("table", array![[1.0f32, 2.0], [3.0, 4.0]]);
    let w = g.shared("w", array![1.0f32, 1.0]);
    let acc = g.shared("acc", ndarray::arr0(0.0f32));
    let picked = table.take(&i, 0).sum_all();
    // w's update comes first, so its kernel runs before the gather
    let mut f = g.function([&i], []).updates([(&w, &w * 2.0), (&acc, &acc + &picked)]).compile(Device::Cpu).unwrap();
    let e = f.call(&[array![0i64, 7].into()]).unwrap_err().to_string();
    assert!(e.contains("index 7 out of range for an axis of size 2"), "{e}");
    assert_eq!(w.value().unwrap(), Tensor::from(array![1.0f32, 1.0]));
    f.call(&[array![1i64, -1].into()]).unwrap();
    assert_eq!(acc.value().unwrap().item(), Some(14.0));
    assert_eq!(w.value().unwrap(), Tensor::from(array![2.0f32, 2.0]));
}
