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
