//! Rewrite filetests: a small graph in, the optimized graph printed out (insta snapshots), one per
//! rule family, with the rewrite log showing which rules fired; and numerical goldens that the
//! stabilization rules exist for.

use kiln::prelude::*;
use kiln::OptimizeOptions;

const NO_FUSION: OptimizeOptions = OptimizeOptions { rewrite: true, fuse: false };

fn optimized(g: &Graph, inputs: &[&Var], outputs: &[&Var], opts: OptimizeOptions) -> String {
    let f =
        g.function(inputs.iter().copied(), outputs.iter().copied()).optimize(opts).compile(Device::Reference).unwrap();
    format!("{}\n-- rules fired --\n{}", f.debugprint(), f.rewrite_log())
}

#[test]
fn algebraic() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n"), 4.into()]);
    let y = g.input("y", F32, [Dim::sym("n"), 4.into()]);
    // ((x * 1 + 0) - (-y)) / 1, -(-x) ** 2, x / 4, reshape(reshape(x)), permute(permute(x))
    let a = ((&x * 1.0 + 0.0) - (-&y)) / 1.0;
    let b = (-(-&x)).pow(2.0) + &x / 4.0;
    let c = x.reshape(&[-1, 2, 2]).reshape(&[-1, 4]) + x.t().t();
    insta::assert_snapshot!(optimized(&g, &[&x, &y], &[&a, &b, &c], NO_FUSION));
}

#[test]
fn stabilize() {
    let g = Graph::new();
    let z = g.input("z", F32, [Dim::sym("n"), 10.into()]);
    let t = g.input("t", F32, [Dim::sym("n"), 10.into()]);
    let ce = z.softmax(-1).categorical_crossentropy(&t).mean_all();
    let bce = z.sigmoid().binary_crossentropy(&t).mean_all();
    let l1p = (z.exp() + 1.0).log();
    let em1 = z.exp() - 1.0;
    insta::assert_snapshot!(optimized(&g, &[&z, &t], &[&ce, &bce, &l1p, &em1], NO_FUSION));
}

#[test]
fn constant_fold_merge_and_dead_code() {
    let g = Graph::new();
    let x = g.input("x", F64, [3]);
    let unused = g.input("unused", F64, [3]);
    let two = g.constant(array![1.0, 2.0, 3.0]) * 2.0 + g.scalar(F64, 1.0).exp();
    let dup1 = (&x * &two).tanh();
    let dup2 = (&x * &two).tanh();
    let _dead = unused.sigmoid();
    let out = &dup1 + &dup2;
    let text = optimized(&g, &[&x, &unused], &[&out], NO_FUSION);
    insta::assert_snapshot!(text);
}

#[test]
fn fusion_of_elementwise_regions_and_reduction_prologues() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 784.into()]);
    let w = g.shared("w", Array2::<f32>::zeros((784, 10)));
    let b = g.shared("b", Array1::<f32>::zeros(10));
    let h = (x.matmul(&w) + &b).relu();
    // an elementwise chain whose result feeds a sum: one kernel with a reduction epilogue
    let cost = ((&h - 0.5) * (&h - 0.5)).mean_all();
    insta::assert_snapshot!(optimized(&g, &[&x], &[&cost, &h], OptimizeOptions::default()));
}

#[test]
fn sgd_training_step_graph() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 4.into()]);
    let y = g.input("y", I64, [Dim::sym("batch")]);
    let w = g.shared("w", Array2::<f32>::zeros((4, 3)));
    let b = g.shared("b", Array1::<f32>::zeros(3));
    let cost = (x.matmul(&w) + &b).softmax(-1).sparse_categorical_crossentropy(&y).mean_all();
    let [gw, gb] = g.grad(&cost, [&w, &b]).unwrap();
    let f = g
        .function([&x, &y], [&cost])
        .updates([(&w, &w - 0.1 * gw), (&b, &b - 0.1 * gb)])
        .compile(Device::Reference)
        .unwrap();
    insta::assert_snapshot!(format!("{}\n-- rules fired --\n{}", f.debugprint(), f.rewrite_log()));
    insta::assert_snapshot!("sgd_training_step_dot", f.to_dot());
}

#[test]
fn log_one_plus_exp_800_is_800() {
    // as an input value
    let g = Graph::new();
    let x = g.input("x", F64, [2]);
    let y = (x.exp() + 1.0).log();
    let mut f = g.function([&x], [&y]).compile(Device::Reference).unwrap();
    let out = f.call1(&[array![800.0, -700.0].into()]).unwrap().to_f64_vec();
    assert_eq!(out[0], 800.0);
    // log(1 + e^-700) = e^-700 to full precision (the naive form rounds it to 0)
    assert!((out[1] / (-700f64).exp() - 1.0).abs() < 1e-15, "{}", out[1]);
    // as a constant: stabilized before folding, so it folds to 800 and not inf
    let c = (g.scalar(F64, 800.0).exp() + 1.0).log();
    let mut f = g.function([], [&c]).compile(Device::Reference).unwrap();
    assert_eq!(f.call1(&[]).unwrap().item(), Some(800.0));
    assert!(f.debugprint().starts_with("800.0 [id A]"), "{}", f.debugprint());
    // and in f32
    let z = g.input("z", F32, [1]);
    let mut f = g.function([&z], [&(z.exp() + 1.0).log()]).compile(Device::Reference).unwrap();
    assert_eq!(f.call1(&[array![800.0f32].into()]).unwrap().item(), Some(800.0));
}

#[test]
fn log_softmax_gradient_at_1e4_is_finite_and_right() {
    let g = Graph::new();
    let x = g.input("x", F64, [2, 4]);
    let w = g.constant(array![[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.0, 3.0]]);
    let cost = (x.softmax(-1).log() * &w).sum_all();
    let [gx] = g.grad(&cost, [&x]).unwrap();
    let mut f = g.function([&x], [&gx]).compile(Device::Reference).unwrap();
    let xs = array![[1e4, -1e4, 2e4, 0.0], [1e4, 1e4 + 1.0, -3e4, 1e4]];
    let got = f.call1(&[xs.clone().into()]).unwrap().to_f64_vec();
    // d/dx sum(w * log_softmax(x)) = w - softmax(x) * sum(w), row by row
    let wv = [[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.0, 3.0]];
    for r in 0..2 {
        let row: Vec<f64> = (0..4).map(|c| xs[[r, c]]).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        let sw: f64 = wv[r].iter().sum();
        for c in 0..4 {
            let want = wv[r][c] - (row[c] - m).exp() / z * sw;
            let v = got[r * 4 + c];
            assert!(v.is_finite() && (v - want).abs() < 1e-12, "[{r},{c}] {v} vs {want}");
        }
    }
}

#[test]
fn sgd_with_huge_learning_rate_drives_softmax_cross_entropy_to_zero() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n"), 3.into()]);
    let y = g.input("y", I64, [Dim::sym("n")]);
    let w = g.shared("w", Array2::<f32>::zeros((3, 3)));
    let cost = x.matmul(&w).softmax(-1).sparse_categorical_crossentropy(&y).mean_all();
    let [gw] = g.grad(&cost, [&w]).unwrap();
    let mut step = g.function([&x, &y], [&cost]).updates([(&w, &w - 1e4 * gw)]).compile(Device::Reference).unwrap();
    let xs = array![[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let ys = array![2i64, 0, 1];
    let mut loss = f64::NAN;
    for i in 0..100 {
        loss = step.call1(&[xs.clone().into(), ys.clone().into()]).unwrap().item().unwrap();
        assert!(loss.is_finite(), "step {i}: loss {loss}");
    }
    assert!(loss < 1e-6, "final loss {loss}");
    let wv = w.value().unwrap();
    assert!(wv.to_f64_vec().iter().all(|v| v.is_finite()), "weights {wv:?}");
}
