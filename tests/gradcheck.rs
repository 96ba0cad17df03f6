//! Finite-difference gradient checks (f64, random projection of the output, as Theano's verify_grad)
//! for every differentiable op and for composed models, on every backend.
#![allow(clippy::cloned_ref_to_slice_refs, clippy::type_complexity)]

use kiln::prelude::*;
use kiln::testing::{random_tensor, verify_grad, GradCheck};

/// Checks on every backend, unoptimized and optimized.
fn check(name: &str, f: impl Fn(&Graph, &[Var]) -> Var, inputs: &[Tensor]) {
    for device in kiln::testing::test_devices() {
        for optimize in [false, true] {
            kiln::testing::in_each_cuda_form(device, |form| {
                let opts = GradCheck { optimize, device, ..Default::default() };
                match verify_grad(&f, inputs, opts) {
                    Ok(err) => assert!(err < 1e-5, "{name} on {device:?}{form}: error {err}"),
                    Err(e) => panic!("{name} on {device:?}{form} (optimize={optimize}): {e}"),
                }
            });
        }
    }
}

fn r(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    random_tensor(shape, lo, hi, seed)
}

/// Values in [lo, hi) with random signs, keeping away from zero (for abs, relu, sign...).
fn away_from_zero(shape: &[usize], seed: u64) -> Tensor {
    let t = r(shape, 0.2, 2.0, seed).to_f64_vec();
    let s = r(shape, -1.0, 1.0, seed + 1).to_f64_vec();
    let v: Vec<f64> = t.iter().zip(s).map(|(a, b)| if b < 0.0 { -a } else { *a }).collect();
    Tensor::from_f64(F64, shape, &v)
}

#[test]
fn unary_ops() {
    let x = r(&[2, 3], -2.0, 2.0, 1);
    let pos = r(&[2, 3], 0.3, 3.0, 2);
    let nz = away_from_zero(&[2, 3], 3);
    let cases: Vec<(&str, fn(&Var) -> Var, &Tensor)> = vec![
        ("neg", |v| -v, &x),
        ("exp", |v| v.exp(), &x),
        ("log", |v| v.log(), &pos),
        ("log1p", |v| v.log1p(), &pos),
        ("expm1", |v| v.expm1(), &x),
        ("sqrt", |v| v.sqrt(), &pos),
        ("rsqrt", |v| v.rsqrt(), &pos),
        ("reciprocal", |v| v.reciprocal(), &nz),
        ("abs", |v| v.abs(), &nz),
        ("sign", |v| v.sign() * v, &nz),
        ("tanh", |v| v.tanh(), &x),
        ("sigmoid", |v| v.sigmoid(), &x),
        ("relu", |v| v.relu(), &nz),
        ("softplus", |v| v.softplus(), &x),
        ("sin", |v| v.sin(), &x),
        ("cos", |v| v.cos(), &x),
        ("floor", |v| v.floor() + v, &pos),
        ("ceil", |v| v.ceil() * v, &pos),
    ];
    for (name, f, input) in cases {
        check(name, |_, v| f(&v[0]), &[input.clone()]);
    }
}

#[test]
fn float32_with_float32_step_and_tolerance() {
    let opts = GradCheck::for_dtype(F32);
    let x = r(&[2, 3], -1.0, 1.0, 50).cast(F32);
    let w = r(&[3, 4], -1.0, 1.0, 51).cast(F32);
    let f = |_: &Graph, v: &[Var]| v[0].matmul(&v[1]).tanh().softmax(-1).log();
    let err = verify_grad(f, &[x, w], opts).unwrap();
    assert!(err < 1e-2, "{err}");
}

#[test]
fn cast_through_f32() {
    let opts = GradCheck { eps: 1e-2, atol: 1e-4, ..Default::default() };
    let x = r(&[3], -1.0, 1.0, 4);
    verify_grad(|_, v| v[0].cast(F32).cast(F64) * 3.0, &[x], opts).unwrap();
}

#[test]
fn binary_ops_with_broadcasting() {
    let shapes: [(&[usize], &[usize]); 4] = [(&[2, 3], &[2, 3]), (&[2, 3], &[3]), (&[2, 1], &[1, 3]), (&[], &[2, 3])];
    for (sa, sb) in shapes {
        let (a, b) = (r(sa, -2.0, 2.0, 5), r(sb, -2.0, 2.0, 6));
        let (pa, pb) = (r(sa, 0.5, 2.0, 7), r(sb, 0.5, 2.0, 8));
        check("add", |_, v| &v[0] + &v[1], &[a.clone(), b.clone()]);
        check("sub", |_, v| &v[0] - &v[1], &[a.clone(), b.clone()]);
        check("mul", |_, v| &v[0] * &v[1], &[a.clone(), b.clone()]);
        check("div", |_, v| &v[0] / &v[1], &[a.clone(), pb.clone()]);
        check("pow", |_, v| v[0].pow(&v[1]), &[pa.clone(), b.clone()]);
        // distinct values, so the max is differentiable
        let b2 = Tensor::from_f64(F64, sb, &b.to_f64_vec().iter().map(|x| x + 0.05).collect::<Vec<_>>());
        check("maximum", |_, v| v[0].maximum(&v[1]), &[a.clone(), b2.clone()]);
        check("minimum", |_, v| v[0].minimum(&v[1]), &[a.clone(), b2.clone()]);
    }
}

#[test]
fn where_with_broadcasting() {
    let x = r(&[2, 3], -1.0, 1.0, 9);
    let y = r(&[3], -1.0, 1.0, 10);
    check("where", |_, v| v[0].gt(0.0).select(&v[0] * 2.0, &v[1]), &[x, y]);
}

#[test]
fn reductions() {
    let x = r(&[2, 3, 4], -1.0, 1.0, 11);
    let pos = r(&[2, 3, 4], 0.5, 1.5, 12);
    for axes in [&[0isize][..], &[1], &[2], &[0, 2], &[0, 1, 2]] {
        check("sum", |_, v| v[0].sum(axes), &[x.clone()]);
        check("sum_keepdims", |_, v| v[0].sum_keepdims(axes), &[x.clone()]);
        check("mean", |_, v| v[0].mean(axes), &[x.clone()]);
        check("max", |_, v| v[0].max(axes), &[x.clone()]);
        check("min_keepdims", |_, v| v[0].min_keepdims(axes), &[x.clone()]);
        check("prod", |_, v| v[0].prod(axes), &[pos.clone()]);
    }
}

#[test]
fn matmul_plain_batched_and_vector() {
    check("matmul", |_, v| v[0].matmul(&v[1]), &[r(&[3, 4], -1.0, 1.0, 13), r(&[4, 5], -1.0, 1.0, 14)]);
    check("batched", |_, v| v[0].matmul(&v[1]), &[r(&[2, 3, 4], -1.0, 1.0, 15), r(&[2, 4, 5], -1.0, 1.0, 16)]);
    check("batch-broadcast", |_, v| v[0].matmul(&v[1]), &[r(&[2, 3, 4], -1.0, 1.0, 17), r(&[4, 5], -1.0, 1.0, 18)]);
    check("batch-broadcast-rhs", |_, v| v[0].matmul(&v[1]), &[r(&[3, 4], -1.0, 1.0, 19), r(&[2, 4, 5], -1.0, 1.0, 20)]);
    check("matrix-vector", |_, v| v[0].matmul(&v[1]), &[r(&[3, 4], -1.0, 1.0, 21), r(&[4], -1.0, 1.0, 22)]);
    check("vector-matrix", |_, v| v[0].matmul(&v[1]), &[r(&[3], -1.0, 1.0, 23), r(&[3, 4], -1.0, 1.0, 24)]);
    check("transpose", |_, v| v[0].t().matmul(&v[1]), &[r(&[4, 3], -1.0, 1.0, 25), r(&[4, 2], -1.0, 1.0, 26)]);
}

#[test]
fn movement() {
    let x = r(&[2, 3, 4], -1.0, 1.0, 27);
    check("reshape", |_, v| v[0].reshape(&[4, -1]), &[x.clone()]);
    check("flatten", |_, v| v[0].flatten(), &[x.clone()]);
    check("permute", |_, v| v[0].permute(&[2, 0, 1]), &[x.clone()]);
    check(
        "broadcast_to",
        |_, v| v[0].sum_keepdims(&[1]).broadcast_to(&[5.into(), 2.into(), 3.into(), 4.into()]),
        &[x.clone()],
    );
    check("slice", |_, v| v[0].slice(&[(Some(1), None, 1), (None, None, 2), (Some(-1), Some(0), -2)]), &[x.clone()]);
    check("slice_axis", |_, v| v[0].slice_axis(2, Some(1), Some(3), 1), &[x.clone()]);
    let y = r(&[2, 5, 4], -1.0, 1.0, 28);
    check("concat", |_, v| concat(&[&v[0], &v[1], &v[0]], 1), &[x.clone(), y]);
    check("stack", |_, v| stack(&[&v[0], &v[1]], 1), &[x.clone(), r(&[2, 3, 4], -1.0, 1.0, 29)]);
    check("take", |g, v| v[0].take(&g.constant(array![2i64, 0, 2, -1]), 1), &[x.clone()]);
    check("take-2d-indices", |g, v| v[0].take(&g.constant(array![[1i64, 0], [3, 3]]), 2), &[x]);
}

#[test]
fn nn_ops_and_losses() {
    let z = r(&[3, 5], -2.0, 2.0, 30);
    let t = r(&[3, 5], 0.0, 1.0, 31);
    check("softmax", |_, v| v[0].softmax(-1), &[z.clone()]);
    check("softmax-axis0", |_, v| v[0].softmax(0), &[z.clone()]);
    check("log_softmax", |_, v| v[0].log_softmax(-1), &[z.clone()]);
    check("softmax_cross_entropy", |_, v| v[0].softmax_cross_entropy_with_logits(&v[1]), &[z.clone(), t.clone()]);
    check("categorical_crossentropy", |_, v| v[0].softmax(-1).categorical_crossentropy(&v[1]), &[z.clone(), t.clone()]);
    check(
        "sparse_categorical",
        |g, v| v[0].softmax(-1).sparse_categorical_crossentropy(&g.constant(array![4i64, 0, 2])),
        &[z.clone()],
    );
    check("binary_crossentropy", |_, v| v[0].sigmoid().binary_crossentropy(&v[1]), &[z, t]);
}

#[test]
fn mlp_with_softmax_cross_entropy_l2_and_dropout() {
    let x = r(&[4, 6], -1.0, 1.0, 40);
    let w1 = r(&[6, 5], -0.5, 0.5, 41);
    let b1 = r(&[5], -0.1, 0.1, 42);
    let w2 = r(&[5, 3], -0.5, 0.5, 43);
    let b2 = r(&[3], -0.1, 0.1, 44);
    let model = |g: &Graph, v: &[Var]| {
        let rng = g.frozen_rng(7, 3);
        let labels = g.constant(array![0i64, 2, 1, 2]);
        // tanh keeps the check away from relu's kink; dropout with a fixed mask
        let h = (v[0].matmul(&v[1]) + &v[2]).tanh().dropout(0.5, &rng);
        let logits = h.matmul(&v[3]) + &v[4];
        let ce = logits.softmax(-1).sparse_categorical_crossentropy(&labels).mean_all();
        let l2 = (&v[1] * &v[1]).sum_all() * 1e-2 + (&v[3] * &v[3]).sum_all() * 1e-2;
        ce + l2
    };
    check("mlp", model, &[x, w1, b1, w2, b2]);
}

#[test]
fn second_order_hessian_vector_product() {
    // f(x) = sum(tanh(W x)^2); Hv by differentiating (grad f) . v, against differences of grad f.
    let g = Graph::new();
    let x = g.input("x", F64, [3]);
    let v = g.input("v", F64, [3]);
    let w = g.constant(array![[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]]);
    let f = w.matmul(&x).tanh().pow(2.0).sum_all();
    let [gx] = g.grad(&f, [&x]).unwrap();
    let [hv] = g.grad(&(&gx * &v).sum_all(), [&x]).unwrap();
    let mut fun = g.function([&x, &v], [&hv, &gx]).compile(Device::Reference).unwrap();
    let (x0, v0) = (array![0.3, -0.2, 0.5], array![1.0, 0.5, -2.0]);
    let hv0 = fun.call(&[x0.clone().into(), v0.clone().into()]).unwrap()[0].to_f64_vec();
    let eps = 1e-6;
    let gat =
        |fun: &mut Function, s: f64| fun.call(&[(&x0 + &(&v0 * s)).into(), v0.clone().into()]).unwrap()[1].to_f64_vec();
    let (gp, gm) = (gat(&mut fun, eps), gat(&mut fun, -eps));
    for i in 0..3 {
        let numeric = (gp[i] - gm[i]) / (2.0 * eps);
        assert!((numeric - hv0[i]).abs() < 1e-6, "Hv[{i}]: {} vs {numeric}", hv0[i]);
    }
}

#[test]
fn jacobian_and_hessian_helpers() {
    let g = Graph::new();
    let x = g.input("x", F64, [2]);
    let y = (&x * &x).sum_all() * 0.5
        + x.slice(&[(Some(0), Some(1), 1)]).sum_all() * x.slice(&[(Some(1), Some(2), 1)]).sum_all();
    let h = g.hessian(&y, &x).unwrap();
    let j = g.jacobian(&(x.exp()), &x).unwrap();
    let mut fun = g.function([&x], [&h, &j]).compile(Device::Reference).unwrap();
    let out = fun.call(&[array![0.5, -1.0].into()]).unwrap();
    assert_eq!(out[0].shape(), &[2, 2]);
    assert!(out[0].allclose(&Tensor::from(array![[1.0, 1.0], [1.0, 1.0]]), 0.0, 1e-12), "{:?}", out[0]);
    let e = [0.5f64.exp(), (-1.0f64).exp()];
    assert!(out[1].allclose(&Tensor::from(array![[e[0], 0.0], [0.0, e[1]]]), 1e-12, 0.0), "{:?}", out[1]);
}
