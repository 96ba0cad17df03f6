//! The op table: for every op, its type rule (the printed output type, with symbolic dims) and its
//! reference value against an independent computation (plain Rust loops or ndarray), on shapes that
//! are not square and with broadcasting. Each row runs on every backend (the reference interpreter,
//! the Cranelift CPU backend, and the CUDA backend where a GPU is present), both unoptimized and
//! through the full pipeline (fused); the CUDA C of every row is compiled by NVRTC wherever
//! libnvrtc is found, GPU or not.
#![allow(clippy::cloned_ref_to_slice_refs, clippy::type_complexity)]

use kiln::prelude::*;
use kiln::OptimizeOptions;
use ndarray::{ArrayD, IxDyn};

const NONE: OptimizeOptions = OptimizeOptions { rewrite: false, fuse: false };

/// Builds `f` over inputs declared with `decl` (dtype, dims), checks the output type, evaluates it
/// on `args` unoptimized and optimized, and compares both to `want`.
fn row(
    name: &str,
    decl: &[(DType, Vec<Dim>)],
    f: impl Fn(&Graph, &[Var]) -> Var,
    ty: &str,
    args: &[Tensor],
    want: &Tensor,
    tol: f64,
) {
    let g = Graph::new();
    let vars: Vec<Var> = decl.iter().enumerate().map(|(i, (d, s))| g.input(&format!("x{i}"), *d, s.clone())).collect();
    let out = f(&g, &vars);
    let t = out.ty().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.to_string(), ty, "{name}: type rule");
    for device in kiln::testing::test_devices() {
        for opts in [NONE, OptimizeOptions::default()] {
            kiln::testing::in_each_cuda_form(device, |form| {
                let mut fun = g.function(vars.iter(), [&out]).optimize(opts).compile(device).unwrap();
                if device == Device::Reference {
                    // Every kernel the CUDA backend would emit for this row compiles (no GPU needed).
                    let ok = kiln::testing::check_cuda_source_compiles(&fun, args);
                    ok.unwrap_or_else(|e| panic!("{name} CUDA C: {e}"));
                }
                let got = fun.call1(args).unwrap_or_else(|e| panic!("{name} on {device:?}{form}: {e}"));
                assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
                let close = got.allclose(want, tol, tol);
                assert!(close, "{name} on {device:?}{form} ({opts:?}):\n got {got:?}\nwant {want:?}");
            });
        }
    }
}

fn fixed(d: DType, s: &[usize]) -> (DType, Vec<Dim>) {
    (d, s.iter().map(|&n| Dim::Fixed(n)).collect())
}
fn f32s(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::from_f64(F32, shape, v)
}
fn seq(n: usize, scale: f64, offset: f64) -> Vec<f64> {
    (0..n).map(|i| i as f64 * scale + offset).collect()
}

#[test]
fn unary_float_ops() {
    let x = seq(6, 0.7, -1.9); // [-1.9, -1.2, ...] never exactly 0
    let pos = seq(6, 0.45, 0.3);
    type F = fn(f64) -> f64;
    let sig: F = |v| 1.0 / (1.0 + (-v).exp());
    let cases: Vec<(&str, UnaryOp, F, &Vec<f64>)> = vec![
        ("neg", UnaryOp::Neg, |v| -v, &x),
        ("exp", UnaryOp::Exp, f64::exp, &x),
        ("log", UnaryOp::Log, f64::ln, &pos),
        ("log1p", UnaryOp::Log1p, f64::ln_1p, &pos),
        ("expm1", UnaryOp::Expm1, f64::exp_m1, &x),
        ("sqrt", UnaryOp::Sqrt, f64::sqrt, &pos),
        ("rsqrt", UnaryOp::Rsqrt, |v| 1.0 / v.sqrt(), &pos),
        ("reciprocal", UnaryOp::Reciprocal, |v| 1.0 / v, &x),
        ("abs", UnaryOp::Abs, f64::abs, &x),
        ("sign", UnaryOp::Sign, f64::signum, &x),
        ("tanh", UnaryOp::Tanh, f64::tanh, &x),
        ("sigmoid", UnaryOp::Sigmoid, sig, &x),
        ("relu", UnaryOp::Relu, |v| v.max(0.0), &x),
        ("softplus", UnaryOp::Softplus, |v| (1.0 + v.exp()).ln(), &x),
        ("sin", UnaryOp::Sin, f64::sin, &x),
        ("cos", UnaryOp::Cos, f64::cos, &x),
        ("floor", UnaryOp::Floor, f64::floor, &x),
        ("ceil", UnaryOp::Ceil, f64::ceil, &x),
    ];
    for (name, op, f, input) in cases {
        let want: Vec<f64> = input.iter().map(|&v| f(v as f32 as f64)).collect();
        for dtype in [F32, F64] {
            let decl = [(dtype, vec![Dim::sym("n"), 3.into()])];
            let ty = format!("{dtype}[n,3]");
            let arg = Tensor::from_f64(dtype, &[2, 3], &input.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>());
            row(name, &decl, |_, v| v[0].unary(op), &ty, &[arg], &Tensor::from_f64(dtype, &[2, 3], &want), 2e-7);
        }
    }
}

#[test]
fn unary_int_bool_and_cast() {
    let xi = Tensor::from(array![[-3i64, 0, 5], [7, -1, 2]]);
    let d = [fixed(I64, &[2, 3])];
    row("neg i64", &d, |_, v| -&v[0], "i64[2,3]", &[xi.clone()], &array![[3i64, 0, -5], [-7, 1, -2]].into(), 0.0);
    row("abs i64", &d, |_, v| v[0].abs(), "i64[2,3]", &[xi.clone()], &array![[3i64, 0, 5], [7, 1, 2]].into(), 0.0);
    row("sign i64", &d, |_, v| v[0].sign(), "i64[2,3]", &[xi.clone()], &array![[-1i64, 0, 1], [1, -1, 1]].into(), 0.0);
    row("relu i64", &d, |_, v| v[0].relu(), "i64[2,3]", &[xi.clone()], &array![[0i64, 0, 5], [7, 0, 2]].into(), 0.0);
    row(
        "cast i64->f32",
        &d,
        |_, v| v[0].cast(F32),
        "f32[2,3]",
        &[xi.clone()],
        &array![[-3f32, 0., 5.], [7., -1., 2.]].into(),
        0.0,
    );
    row(
        "cast i64->bool",
        &d,
        |_, v| v[0].cast(Bool),
        "bool[2,3]",
        &[xi],
        &array![[true, false, true], [true, true, true]].into(),
        0.0,
    );
    let xf = Tensor::from(array![-1.7f32, 2.9, 0.2]);
    row(
        "cast f32->i32",
        &[fixed(F32, &[3])],
        |_, v| v[0].cast(I32),
        "i32[3]",
        &[xf.clone()],
        &array![-1i32, 2, 0].into(),
        0.0,
    );
    row(
        "cast f32->f64",
        &[fixed(F32, &[3])],
        |_, v| v[0].cast(F64),
        "f64[3]",
        &[xf],
        &array![-1.7f32 as f64, 2.9f32 as f64, 0.2f32 as f64].into(),
        0.0,
    );
    let b = Tensor::from(array![true, false]);
    row("not", &[fixed(Bool, &[2])], |_, v| v[0].not(), "bool[2]", &[b], &array![false, true].into(), 0.0);
}

/// numpy broadcasting of two shapes by explicit index arithmetic (independent of ndarray's).
fn broadcast_apply(a: &Tensor, b: &Tensor, f: impl Fn(f64, f64) -> f64) -> (Vec<usize>, Vec<f64>) {
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let n = sa.len().max(sb.len());
    let pad = |s: &[usize]| [vec![1; n - s.len()], s.to_vec()].concat();
    let (pa, pb) = (pad(&sa), pad(&sb));
    let out: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
    let (va, vb) = (a.to_f64_vec(), b.to_f64_vec());
    let total: usize = out.iter().product();
    let mut res = Vec::with_capacity(total);
    for flat in 0..total {
        let (mut ia, mut ib, mut rem) = (0, 0, flat);
        let (mut sta, mut stb) = (1, 1);
        for ax in (0..n).rev() {
            let i = rem % out[ax];
            rem /= out[ax];
            ia += if pa[ax] == 1 { 0 } else { i * sta };
            ib += if pb[ax] == 1 { 0 } else { i * stb };
            sta *= pa[ax];
            stb *= pb[ax];
        }
        res.push(f(va[ia], vb[ib]));
    }
    (out, res)
}

#[test]
fn binary_ops_broadcast() {
    let pairs: [(&[usize], &[usize], &str); 4] = [
        (&[2, 3], &[2, 3], "[2,3]"),
        (&[2, 3], &[3], "[2,3]"),
        (&[2, 1], &[1, 3], "[2,3]"),
        (&[4, 1, 3], &[2, 1], "[4,2,3]"),
    ];
    type F = fn(f64, f64) -> f64;
    let arith: Vec<(BinaryOp, F)> = vec![
        (BinaryOp::Add, |a, b| a + b),
        (BinaryOp::Sub, |a, b| a - b),
        (BinaryOp::Mul, |a, b| a * b),
        (BinaryOp::Div, |a, b| a / b),
        (BinaryOp::Pow, |a, b| a.abs().powf(b)),
        (BinaryOp::Maximum, f64::max),
        (BinaryOp::Minimum, f64::min),
    ];
    let cmp: Vec<(BinaryOp, fn(f64, f64) -> bool)> = vec![
        (BinaryOp::Eq, |a, b| a == b),
        (BinaryOp::Ne, |a, b| a != b),
        (BinaryOp::Lt, |a, b| a < b),
        (BinaryOp::Le, |a, b| a <= b),
        (BinaryOp::Gt, |a, b| a > b),
        (BinaryOp::Ge, |a, b| a >= b),
    ];
    for (sa, sb, s) in pairs {
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = f32s(sa, &seq(na, 0.5, 0.25));
        let b = f32s(sb, &seq(nb, -0.75, 1.0).iter().map(|v| (v * 4.0).round() / 4.0).collect::<Vec<_>>());
        let decl = [fixed(F32, sa), fixed(F32, sb)];
        for (op, f) in &arith {
            let (shape, v) = broadcast_apply(&a, &b, *f);
            row(
                op.name(),
                &decl,
                |_, x| x[0].abs().binary(*op, &x[1]),
                &format!("f32{s}"),
                &[a.clone(), b.clone()],
                &f32s(&shape, &v),
                1e-6,
            );
        }
        for (op, f) in &cmp {
            let (shape, v) = broadcast_apply(&a, &b, |x, y| f(x, y) as u8 as f64);
            let want = Tensor::from_f64(Bool, &shape, &v);
            row(
                op.name(),
                &decl,
                |_, x| x[0].binary(*op, &x[1]),
                &format!("bool{s}"),
                &[a.clone(), b.clone()],
                &want,
                0.0,
            );
        }
    }
    let ia = Tensor::from(array![[1i64, -2, 3], [4, 5, -6]]);
    let ib = Tensor::from(array![10i64, 20, 30]);
    let d = [fixed(I64, &[2, 3]), fixed(I64, &[3])];
    row(
        "add i64",
        &d,
        |_, v| &v[0] + &v[1],
        "i64[2,3]",
        &[ia.clone(), ib.clone()],
        &array![[11i64, 18, 33], [14, 25, 24]].into(),
        0.0,
    );
    row(
        "mul i64",
        &d,
        |_, v| &v[0] * &v[1],
        "i64[2,3]",
        &[ia.clone(), ib.clone()],
        &array![[10i64, -40, 90], [40, 100, -180]].into(),
        0.0,
    );
    row(
        "max i64",
        &d,
        |_, v| v[0].maximum(&v[1]),
        "i64[2,3]",
        &[ia, ib],
        &array![[10i64, 20, 30], [10, 20, 30]].into(),
        0.0,
    );
    let p = Tensor::from(array![[true, false], [true, true]]);
    let q = Tensor::from(array![true, false]);
    let d = [fixed(Bool, &[2, 2]), fixed(Bool, &[2])];
    row(
        "and",
        &d,
        |_, v| v[0].and(&v[1]),
        "bool[2,2]",
        &[p.clone(), q.clone()],
        &array![[true, false], [true, false]].into(),
        0.0,
    );
    row("or", &d, |_, v| v[0].or(&v[1]), "bool[2,2]", &[p, q], &array![[true, false], [true, true]].into(), 0.0);
}

#[test]
fn where_broadcast() {
    let c = Tensor::from(array![[true], [false]]);
    let a = f32s(&[2, 3], &seq(6, 1.0, 0.0));
    let b = f32s(&[3], &[-1.0, -2.0, -3.0]);
    let d = [fixed(Bool, &[2, 1]), fixed(F32, &[2, 3]), fixed(F32, &[3])];
    row(
        "where",
        &d,
        |_, v| v[0].select(&v[1], &v[2]),
        "f32[2,3]",
        &[c, a, b],
        &f32s(&[2, 3], &[0., 1., 2., -1., -2., -3.]),
        0.0,
    );
}

#[test]
fn reductions_over_axis_sets() {
    let x: ArrayD<f64> = ArrayD::from_shape_vec(
        IxDyn(&[2, 3, 4]),
        seq(24, 0.37, -4.1).iter().map(|v| (v * 7.0f64).sin() * 3.0).collect(),
    )
    .unwrap();
    let t = Tensor::F64(x.clone());
    let d = [(F64, vec![Dim::sym("b"), 3.into(), 4.into()])];
    let along = |axes: &[usize], f: &dyn Fn(&ndarray::ArrayViewD<f64>) -> f64| -> ArrayD<f64> {
        // reduce the highest axis first so the lower indices stay valid
        let mut cur = vec![x.clone()];
        for &ax in axes.iter().rev() {
            cur = vec![cur[0].map_axis(ndarray::Axis(ax), |lane| f(&lane.into_dyn()))];
        }
        cur.remove(0)
    };
    type R = fn(&ndarray::ArrayViewD<f64>) -> f64;
    let ops: Vec<(&str, R)> = vec![
        ("sum", |l| l.sum()),
        ("max", |l| l.fold(f64::NEG_INFINITY, |a, &b| a.max(b))),
        ("min", |l| l.fold(f64::INFINITY, |a, &b| a.min(b))),
    ];
    for axes in [vec![0usize], vec![1], vec![2], vec![0, 2], vec![1, 2], vec![0, 1, 2]] {
        let iaxes: Vec<isize> = axes.iter().map(|&a| a as isize).collect();
        let kept: Vec<String> =
            ["b", "3", "4"].iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, s)| s.to_string()).collect();
        let ty = format!("f64[{}]", kept.join(","));
        for (name, f) in &ops {
            // nested single-axis folds equal one fold over the set for sum, max and min
            let want = Tensor::F64(along(&axes, &|l| f(l)));
            let op = match *name {
                "sum" => ReduceOp::Sum,
                "max" => ReduceOp::Max,
                _ => ReduceOp::Min,
            };
            row(name, &d, |_, v| v[0].reduce(op, &iaxes, false), &ty, &[t.clone()], &want, 1e-12);
        }
        let n: usize = axes.iter().map(|&a| [2, 3, 4][a]).product();
        let want_mean = Tensor::F64(along(&axes, &|l| l.sum()) / n as f64);
        row("mean", &d, |_, v| v[0].mean(&iaxes), &ty, &[t.clone()], &want_mean, 1e-12);
    }
    // keepdims, prod, argmax (over one axis and over a set, flattened row-major)
    let kd = Tensor::F64(x.sum_axis(ndarray::Axis(1)).insert_axis(ndarray::Axis(1)));
    row("sum keepdims", &d, |_, v| v[0].sum_keepdims(&[1]), "f64[b,1,4]", &[t.clone()], &kd, 1e-12);
    let pr = Tensor::F64(x.map_axis(ndarray::Axis(2), |l| l.iter().product()));
    row("prod", &d, |_, v| v[0].prod(&[-1]), "f64[b,3]", &[t.clone()], &pr, 1e-12);
    let am: Vec<f64> = x
        .lanes(ndarray::Axis(1))
        .into_iter()
        .map(|l| {
            l.iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
                .0 as f64
        })
        .collect();
    row("argmax", &d, |_, v| v[0].argmax(1), "i64[b,4]", &[t.clone()], &Tensor::from_f64(I64, &[2, 4], &am), 0.0);
    let flat: Vec<f64> = (0..2)
        .map(|b| {
            let v: Vec<f64> = (0..12).map(|k| x[[b, k / 4, k % 4]]).collect();
            v.iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &w)| if w > bv { (i, w) } else { (bi, bv) })
                .0 as f64
        })
        .collect();
    row(
        "argmax{1,2}",
        &d,
        |_, v| v[0].reduce(ReduceOp::ArgMax, &[1, 2], false),
        "i64[b]",
        &[t],
        &Tensor::from_f64(I64, &[2], &flat),
        0.0,
    );
}

fn naive_matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

#[test]
fn matmul_shapes() {
    let (a, b) = (seq(6, 0.5, -1.0), seq(12, -0.25, 1.5));
    let want = naive_matmul(&a, &b, 2, 3, 4);
    let d = [(F32, vec![Dim::sym("m"), 3.into()]), fixed(F32, &[3, 4])];
    row(
        "matmul",
        &d,
        |_, v| v[0].matmul(&v[1]),
        "f32[m,4]",
        &[f32s(&[2, 3], &a), f32s(&[3, 4], &b)],
        &f32s(&[2, 4], &want),
        1e-6,
    );
    // batch broadcast: [2,2,3] @ [3,4]
    let a2 = seq(12, 0.3, -2.0);
    let mut want2 = naive_matmul(&a2[..6], &b, 2, 3, 4);
    want2.extend(naive_matmul(&a2[6..], &b, 2, 3, 4));
    let d = [fixed(F32, &[2, 2, 3]), fixed(F32, &[3, 4])];
    row(
        "batched",
        &d,
        |_, v| v[0].matmul(&v[1]),
        "f32[2,2,4]",
        &[f32s(&[2, 2, 3], &a2), f32s(&[3, 4], &b)],
        &f32s(&[2, 2, 4], &want2),
        1e-5,
    );
    // transposed operand: a^T with a [3,2]
    let at: Vec<f64> = (0..6).map(|i| a[(i % 2) * 3 + i / 2]).collect();
    let d = [fixed(F32, &[3, 2]), fixed(F32, &[3, 4])];
    row(
        "matmul t",
        &d,
        |_, v| v[0].t().matmul(&v[1]),
        "f32[2,4]",
        &[f32s(&[3, 2], &at), f32s(&[3, 4], &b)],
        &f32s(&[2, 4], &want),
        1e-6,
    );
    // matrix-vector
    let d = [fixed(F32, &[2, 3]), fixed(F32, &[3])];
    let mv = naive_matmul(&a, &b[..3], 2, 3, 1);
    row(
        "matvec",
        &d,
        |_, v| v[0].matmul(&v[1]),
        "f32[2]",
        &[f32s(&[2, 3], &a), f32s(&[3], &b[..3])],
        &f32s(&[2], &mv),
        1e-6,
    );
}

#[test]
fn movement_ops() {
    let xv = seq(24, 1.0, 0.0);
    let x = f32s(&[2, 3, 4], &xv);
    let d = [(F32, vec![Dim::sym("batch"), 3.into(), 4.into()])];
    row("reshape", &d, |_, v| v[0].reshape(&[-1, 12]), "f32[batch,12]", &[x.clone()], &f32s(&[2, 12], &xv), 0.0);
    row("flatten", &d, |_, v| v[0].flatten(), "f32[batch,12]", &[x.clone()], &f32s(&[2, 12], &xv), 0.0);
    let xa = ArrayD::from_shape_vec(IxDyn(&[2, 3, 4]), xv.clone()).unwrap();
    let p = xa.view().permuted_axes(vec![2, 0, 1]).as_standard_layout().into_owned();
    row("permute", &d, |_, v| v[0].permute(&[2, 0, 1]), "f32[4,batch,3]", &[x.clone()], &Tensor::F64(p).cast(F32), 0.0);
    let b = f32s(&[3, 1], &[1.0, 2.0, 3.0]);
    let bw: Vec<f64> = (0..2).flat_map(|_| (0..3).flat_map(|i| vec![(i + 1) as f64; 4])).collect();
    row(
        "broadcast_to",
        &[fixed(F32, &[3, 1])],
        |_, v| v[0].broadcast_to(&[2.into(), 3.into(), 4.into()]),
        "f32[2,3,4]",
        &[b],
        &f32s(&[2, 3, 4], &bw),
        0.0,
    );
    // x[1:, ::2, -1:0:-2]
    let mut sl = vec![];
    for i in [1] {
        for j in [0, 2] {
            for k in [3, 1] {
                sl.push(xv[i * 12 + j * 4 + k]);
            }
        }
    }
    row(
        "slice",
        &d,
        |_, v| v[0].slice(&[(Some(1), None, 1), (None, None, 2), (Some(-1), Some(0), -2)]),
        "f32[batch[1:],2,2]",
        &[x.clone()],
        &f32s(&[1, 2, 2], &sl),
        0.0,
    );
    let y = f32s(&[2, 1, 4], &seq(8, -1.0, 0.0));
    let mut cat = vec![];
    for i in 0..2 {
        cat.extend_from_slice(&xv[i * 12..i * 12 + 12]);
        cat.extend(seq(8, -1.0, 0.0)[i * 4..i * 4 + 4].iter());
    }
    let d2 = [fixed(F32, &[2, 3, 4]), fixed(F32, &[2, 1, 4])];
    row("concat", &d2, |_, v| concat(&[&v[0], &v[1]], 1), "f32[2,4,4]", &[x.clone(), y], &f32s(&[2, 4, 4], &cat), 0.0);
    let d3 = [fixed(F32, &[2, 3]), fixed(F32, &[2, 3])];
    let (s1, s2) = (seq(6, 1.0, 0.0), seq(6, 1.0, 10.0));
    let st: Vec<f64> = (0..2).flat_map(|i| [&s1[i * 3..i * 3 + 3], &s2[i * 3..i * 3 + 3]].concat()).collect();
    row(
        "stack",
        &d3,
        |_, v| stack(&[&v[0], &v[1]], 1),
        "f32[2,2,3]",
        &[f32s(&[2, 3], &s1), f32s(&[2, 3], &s2)],
        &f32s(&[2, 2, 3], &st),
        0.0,
    );
    // take along axis 2 with 2-d indices [[3, 0], [-1, 1]]
    let idx = [3usize, 0, 3, 1];
    let xr = &xv;
    let tk: Vec<f64> = (0..6).flat_map(|r| idx.iter().map(move |&k| xr[r * 4 + k])).collect();
    let dt = [fixed(F32, &[2, 3, 4]), fixed(I64, &[2, 2])];
    row(
        "take",
        &dt,
        |_, v| v[0].take(&v[1], 2),
        "f32[2,3,2,2]",
        &[x.clone(), array![[3i64, 0], [-1, 1]].into()],
        &f32s(&[2, 3, 2, 2], &tk),
        0.0,
    );
    let labels = Tensor::from(array![2i64, 0, 1]);
    let oh = f32s(&[3, 3], &[0., 0., 1., 1., 0., 0., 0., 1., 0.]);
    row("one_hot", &[(I64, vec![Dim::sym("n")])], |_, v| v[0].one_hot(3, F32), "f32[n,3]", &[labels], &oh, 0.0);
}

#[test]
fn nn_ops() {
    let zv = [1.0, 2.0, 3.0, -1.0, 0.0, 1000.0];
    let z = Tensor::from_f64(F64, &[2, 3], &zv);
    let lse = |r: &[f64]| {
        let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    };
    let ls: Vec<f64> = zv.chunks(3).flat_map(|r| r.iter().map(move |v| v - lse(r))).collect();
    let d = [(F64, vec![Dim::sym("batch"), 3.into()])];
    row(
        "log_softmax",
        &d,
        |_, v| v[0].log_softmax(-1),
        "f64[batch,3]",
        &[z.clone()],
        &Tensor::from_f64(F64, &[2, 3], &ls),
        1e-12,
    );
    let sm: Vec<f64> = ls.iter().map(|v| v.exp()).collect();
    row(
        "softmax",
        &d,
        |_, v| v[0].softmax(-1),
        "f64[batch,3]",
        &[z.clone()],
        &Tensor::from_f64(F64, &[2, 3], &sm),
        1e-12,
    );
    let t = Tensor::from_f64(F64, &[2, 3], &[0.0, 0.5, 0.5, 1.0, 0.0, 0.0]);
    let ce: Vec<f64> =
        (0..2).map(|r| -(0..3).map(|c| t.to_f64_vec()[r * 3 + c] * ls[r * 3 + c]).sum::<f64>()).collect();
    let d2 = [d[0].clone(), d[0].clone()];
    let want = Tensor::from_f64(F64, &[2], &ce);
    row(
        "softmax_ce",
        &d2,
        |_, v| v[0].softmax_cross_entropy_with_logits(&v[1]),
        "f64[batch]",
        &[z.clone(), t.clone()],
        &want,
        1e-12,
    );
    // The naive compositions, on moderate logits (at 1000 the unoptimized form is NaN, which is what
    // stabilization is for; the rewrite tests cover that).
    let zm = Tensor::from_f64(F64, &[2, 3], &[1.0, 2.0, 3.0, -1.0, 0.0, 4.0]);
    let lsm: Vec<f64> =
        zm.to_f64_vec().chunks(3).flat_map(|r| r.iter().map(move |v| v - lse(r)).collect::<Vec<_>>()).collect();
    let cem: Vec<f64> =
        (0..2).map(|r| -(0..3).map(|c| t.to_f64_vec()[r * 3 + c] * lsm[r * 3 + c]).sum::<f64>()).collect();
    let want = Tensor::from_f64(F64, &[2], &cem);
    row(
        "categorical_ce",
        &d2,
        |_, v| v[0].softmax(-1).categorical_crossentropy(&v[1]),
        "f64[batch]",
        &[zm.clone(), t],
        &want,
        1e-9,
    );
    let labels = Tensor::from(array![2i64, 0]);
    let sce = Tensor::from_f64(F64, &[2], &[-lsm[2], -lsm[3]]);
    let d3 = [d[0].clone(), (I64, vec![Dim::sym("batch")])];
    row(
        "sparse_ce",
        &d3,
        |_, v| v[0].softmax(-1).sparse_categorical_crossentropy(&v[1]),
        "f64[batch]",
        &[zm, labels],
        &sce,
        1e-9,
    );
    let p = Tensor::from_f64(F64, &[2, 3], &[0.1, 0.5, 0.9, 0.3, 0.7, 0.2]);
    let tb = Tensor::from_f64(F64, &[2, 3], &[0.0, 1.0, 1.0, 1.0, 0.0, 0.5]);
    let bce: Vec<f64> =
        p.to_f64_vec().iter().zip(tb.to_f64_vec()).map(|(p, t)| -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())).collect();
    row(
        "binary_ce",
        &d2,
        |_, v| v[0].binary_crossentropy(&v[1]),
        "f64[batch,3]",
        &[p, tb],
        &Tensor::from_f64(F64, &[2, 3], &bce),
        1e-12,
    );
}

#[test]
fn random_ops_types_statistics_and_reproducibility() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n"), 1000.into()]);
    let rng = g.rng(42);
    let shape = x.shape().unwrap();
    let u = rng.uniform(&shape, -1.0, 3.0, F32);
    let n = rng.normal(&shape, 2.0, 0.5, F64);
    let b = rng.bernoulli(&shape, 0.3, F32);
    assert_eq!(u.ty().unwrap().to_string(), "f32[n,1000]");
    assert_eq!(n.ty().unwrap().to_string(), "f64[n,1000]");
    let mut f = g.function([&x], [&u, &n, &b]).compile(Device::Reference).unwrap();
    let arg: Tensor = ndarray::Array2::<f32>::zeros((20, 1000)).into();
    let first = f.call(&[arg.clone()]).unwrap();
    let stats = |t: &Tensor| {
        let v = t.to_f64_vec();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
        (
            m,
            var.sqrt(),
            v.iter().cloned().fold(f64::INFINITY, f64::min),
            v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        )
    };
    let (um, _, ulo, uhi) = stats(&first[0]);
    assert!((um - 1.0).abs() < 0.03 && ulo >= -1.0 && uhi < 3.0, "uniform {um} {ulo} {uhi}");
    let (nm, ns, _, _) = stats(&first[1]);
    assert!((nm - 2.0).abs() < 0.02 && (ns - 0.5).abs() < 0.02, "normal {nm} {ns}");
    let (bm, _, blo, bhi) = stats(&first[2]);
    assert!((bm - 0.3).abs() < 0.02 && blo == 0.0 && bhi == 1.0, "bernoulli {bm}");
    // the state advances: the next call draws other numbers; the same seed replays them
    let second = f.call(&[arg.clone()]).unwrap();
    assert_ne!(first[0], second[0]);
    assert_eq!(rng.state().value().unwrap(), Tensor::from(array![42i64, 2]));
    rng.state().set_value(array![42i64, 0]).unwrap();
    assert_eq!(f.call(&[arg.clone()]).unwrap(), first);
    // the CPU backend draws exactly the same numbers from the same state
    let mut cpu = g.function([&x], [&u, &n, &b]).compile(Device::Cpu).unwrap();
    rng.state().set_value(array![42i64, 0]).unwrap();
    let on_cpu = cpu.call(&[arg]).unwrap();
    assert_eq!(on_cpu[0], first[0]);
    assert_eq!(on_cpu[2], first[2]);
    assert!(on_cpu[1].allclose(&first[1], 1e-15, 0.0));
    // and so does the GPU: uniform and bernoulli bit for bit, normal to the accuracy of CUDA's log/cos
    if kiln::testing::test_devices().contains(&Device::Cuda(0)) {
        let mut gpu = g.function([&x], [&u, &n, &b]).compile(Device::Cuda(0)).unwrap();
        rng.state().set_value(array![42i64, 0]).unwrap();
        let arg: Tensor = ndarray::Array2::<f32>::zeros((20, 1000)).into();
        let on_gpu = gpu.call(&[arg]).unwrap();
        assert_eq!(on_gpu[0], first[0]);
        assert_eq!(on_gpu[2], first[2]);
        assert!(on_gpu[1].allclose(&first[1], 1e-12, 1e-12));
        assert_eq!(rng.state().value().unwrap(), Tensor::from(array![42i64, 1]));
    }
}
