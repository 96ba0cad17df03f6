//! The user API end to end: building, compiling, calling, updates, givens, errors.

use kiln::prelude::*;

#[test]
fn logistic_regression_trains_with_updates() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 3.into()]);
    let y = g.input("y", I64, ["batch"]);
    let w = g.shared("w", Array2::<f32>::zeros((3, 2)));
    let b = g.shared("b", Array1::<f32>::zeros(2));
    let logits = x.matmul(&w) + &b;
    let cost = logits
        .softmax(-1)
        .sparse_categorical_crossentropy(&y)
        .mean_all();
    let [gw, gb] = g.grad(&cost, [&w, &b]).unwrap();
    let mut step = g
        .function([&x, &y], [&cost])
        .updates([(&w, &w - 0.5 * gw), (&b, &b - 0.5 * gb)])
        .compile(Device::Reference)
        .unwrap();
    let xs = array![
        [1.0f32, 0.0, 0.5],
        [0.0, 1.0, -0.5],
        [1.0, 0.2, 0.1],
        [0.1, 1.0, 0.0]
    ];
    let ys = array![0i64, 1, 0, 1];
    let first = step
        .call1(&[xs.clone().into(), ys.clone().into()])
        .unwrap()
        .item()
        .unwrap();
    let mut last = first;
    for _ in 0..50 {
        last = step
            .call1(&[xs.clone().into(), ys.clone().into()])
            .unwrap()
            .item()
            .unwrap();
    }
    assert!((first - 2f64.ln()).abs() < 1e-6, "first loss {first}");
    assert!(last < 0.1, "loss did not fall: {first} -> {last}");
    assert!(
        step.rewrite_log().count("softmax_cross_entropy") >= 1,
        "{}",
        step.rewrite_log()
    );
    // a smaller last batch gets its own specialization
    let out = step.call1(&[
        xs.slice(ndarray::s![..3, ..]).to_owned().into(),
        ys.slice(ndarray::s![..3]).to_owned().into(),
    ]);
    assert!(out.is_ok());
}
