//! Snapshots of the CLIF the CPU backend generates for canonical graphs: a fused elementwise chain,
//! a softmax, a matmul + bias + relu, and an SGD update. Kernel names and numbering are stable, and
//! each kernel names the graph node and user line it came from.

use kiln::prelude::*;

fn clif(g: &Graph, inputs: &[&Var], outputs: &[&Var], updates: Vec<(&Var, Var)>, args: &[Tensor]) -> String {
    let mut f =
        g.function(inputs.iter().copied(), outputs.iter().copied()).updates(updates).compile(Device::Cpu).unwrap();
    f.call(args).unwrap();
    f.generated_code()
}

#[test]
fn fused_elementwise_chain() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n")]);
    let y = ((&x * 2.0 + 1.0).tanh() * x.sigmoid()).relu();
    insta::assert_snapshot!(clif(&g, &[&x], &[&y], vec![], &[Array1::<f32>::zeros(8).into()]));
}

#[test]
fn softmax() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 10.into()]);
    let y = x.softmax(-1);
    insta::assert_snapshot!(clif(&g, &[&x], &[&y], vec![], &[Array2::<f32>::zeros((4, 10)).into()]));
}

#[test]
fn matmul_bias_relu() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 8.into()]);
    let w = g.shared("w", Array2::<f32>::zeros((8, 4)));
    let b = g.shared("b", Array1::<f32>::zeros(4));
    let y = (x.matmul(&w) + &b).relu();
    insta::assert_snapshot!(clif(&g, &[&x], &[&y], vec![], &[Array2::<f32>::zeros((2, 8)).into()]));
}

#[test]
fn sgd_momentum_update() {
    let g = Graph::new();
    let grad = g.input("grad", F32, [16, 4]);
    let w = g.shared("w", Array2::<f32>::zeros((16, 4)));
    let v = g.shared("v", Array2::<f32>::zeros((16, 4)));
    let v_new = &v * 0.9 - &grad * 0.01;
    let w_new = &w + &v_new;
    insta::assert_snapshot!(clif(
        &g,
        &[&grad],
        &[],
        vec![(&v, v_new), (&w, w_new)],
        &[Array2::<f32>::zeros((16, 4)).into()]
    ));
}

/// The gradient of a mean over a large batch starts from a constant broadcast to the batch (too big
/// to fold into a constant): the kernels that read it do so through a stride-0 view, with no copy
/// kernel, and the gradient is still right.
#[test]
fn broadcast_read_only_by_elementwise_kernels_is_a_view() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 784.into()]);
    let w = g.shared("w", Array1::<f32>::from_elem(784, 0.5));
    let d = &x * &w - &x;
    let cost = (&d * &d).mean_all();
    let [gw] = g.grad(&cost, [&w]).unwrap();
    let mut f = g.function([&x], [&gw]).compile(Device::Cpu).unwrap();
    let xs = Array2::<f32>::from_shape_fn((128, 784), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.1);
    let got = f.call1(&[xs.clone().into()]).unwrap().to_f64_vec();
    let code = f.generated_code();
    assert!(!code.contains("_broadcast"), "a broadcast copy in:\n{code}");
    // d cost / d w_j = 2 / N sum_i (x_ij w_j - x_ij) x_ij, with N = 128 * 784
    for (j, g) in got.iter().enumerate() {
        let want: f64 =
            (0..128).map(|i| xs[(i, j)] as f64 * (xs[(i, j)] as f64 * 0.5 - xs[(i, j)] as f64)).sum::<f64>() * 2.0
                / (128.0 * 784.0);
        assert!((g - want).abs() <= 1e-6 * want.abs() + 1e-12, "dw[{j}] = {g}, want {want}");
    }
}
