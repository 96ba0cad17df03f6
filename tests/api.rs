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
    let cost = logits.softmax(-1).sparse_categorical_crossentropy(&y).mean_all();
    let [gw, gb] = g.grad(&cost, [&w, &b]).unwrap();
    let mut step =
        g.function([&x, &y], [&cost]).updates([(&w, &w - 0.5 * gw), (&b, &b - 0.5 * gb)]).compile(Device::Cpu).unwrap();
    let xs = array![[1.0f32, 0.0, 0.5], [0.0, 1.0, -0.5], [1.0, 0.2, 0.1], [0.1, 1.0, 0.0]];
    let ys = array![0i64, 1, 0, 1];
    let first = step.call1(&[xs.clone().into(), ys.clone().into()]).unwrap().item().unwrap();
    let mut last = first;
    for _ in 0..50 {
        last = step.call1(&[xs.clone().into(), ys.clone().into()]).unwrap().item().unwrap();
    }
    assert!((first - 2f64.ln()).abs() < 1e-6, "first loss {first}");
    assert!(last < 0.1, "loss did not fall: {first} -> {last}");
    assert!(step.rewrite_log().count("softmax_cross_entropy") >= 1, "{}", step.rewrite_log());
    // a smaller last batch gets its own specialization
    let out =
        step.call1(&[xs.slice(ndarray::s![..3, ..]).to_owned().into(), ys.slice(ndarray::s![..3]).to_owned().into()]);
    assert!(out.is_ok());
}

#[test]
fn updates_use_values_from_before_the_call() {
    // Theano semantics: a and b swap, because both updates read the old values.
    let g = Graph::new();
    let a = g.shared("a", array![1.0f64]);
    let b = g.shared("b", array![2.0f64]);
    let mut swap = g.function([], [&(&a + &b)]).updates([(&a, &b * 1.0), (&b, &a * 1.0)]).compile(Device::Cpu).unwrap();
    let out = swap.call(&[]).unwrap();
    assert_eq!(out[0], Tensor::from(array![3.0]));
    assert_eq!(a.value().unwrap(), Tensor::from(array![2.0]));
    assert_eq!(b.value().unwrap(), Tensor::from(array![1.0]));
    // a counter: shared values persist between calls and can be set from Rust
    let c = g.shared("c", ndarray::arr0(0i64));
    let mut tick = g.function([], [&c]).updates([(&c, &c + 1i64)]).compile(Device::Cpu).unwrap();
    for _ in 0..3 {
        tick.call(&[]).unwrap();
    }
    assert_eq!(c.value().unwrap().item(), Some(3.0));
    c.set_value(ndarray::arr0(10i64)).unwrap();
    assert_eq!(tick.call1(&[]).unwrap().item(), Some(10.0));
    assert_eq!(c.value().unwrap().item(), Some(11.0));
}

#[test]
fn givens_replace_a_variable_in_one_function() {
    // The classic use: feed minibatches from a shared dataset by index.
    let g = Graph::new();
    let data = g.shared("data", array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]]);
    let x = g.input("x", F32, [Dim::sym("batch"), 2.into()]);
    let i = g.input("i", I64, [1]);
    let out = (&x * 2.0).sum(&[1]);
    let mut by_index = g.function([&i], [&out]).givens([(&x, data.take(&i, 0))]).compile(Device::Cpu).unwrap();
    assert_eq!(by_index.call1(&[array![2i64].into()]).unwrap(), Tensor::from(array![22.0f32]));
    let mut plain = g.function([&x], [&out]).compile(Device::Cpu).unwrap();
    assert_eq!(plain.call1(&[array![[1.0f32, 1.0]].into()]).unwrap(), Tensor::from(array![4.0f32]));
}

#[test]
fn debugprint_dot_and_locations() {
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 3.into()]);
    let w = g.shared("w", Array2::<f32>::zeros((3, 2)));
    let h = x.matmul(&w).named("h").sigmoid();
    let text = g.debugprint(&[&h]).unwrap();
    assert_eq!(
        text,
        "sigmoid [id A] <f32[batch,2]>\n |matmul [id B] <f32[batch,2]> 'h'\n | |x (input) [id C] <f32[batch,3]>\n | |w (shared) [id D] <f32[3,2]>\n"
    );
    let f = g.function([&x], [&h]).compile(Device::Cpu).unwrap();
    let with_loc = f.debugprint_with_locations();
    assert!(with_loc.contains("@ tests/api.rs:"), "{with_loc}");
    let dot = f.to_dot();
    assert!(dot.starts_with("digraph kiln {") && dot.contains("-> out0"), "{dot}");
    // the CPU backend generates code per shape signature, at the first call with those shapes
    assert_eq!(f.generated_code(), "");
    let mut f = f;
    f.call(&[Array2::<f32>::zeros((2, 3)).into()]).unwrap();
    let code = f.generated_code();
    assert!(code.contains("computes fused{sigmoid(i0)} @ tests/api.rs:") && code.contains("function %k"), "{code}");
}

#[test]
fn printing_is_deterministic() {
    let build = || {
        let g = Graph::new();
        let x = g.input("x", F32, [Dim::sym("n"), 5.into()]);
        let w = g.shared("w", Array2::<f32>::zeros((5, 5)));
        let c = x.matmul(&w).tanh().softmax(-1).log().mean_all();
        let [gw] = g.grad(&c, [&w]).unwrap();
        let f = g.function([&x], [&c, &gw]).compile(Device::Cpu).unwrap();
        (f.debugprint(), f.to_dot(), f.rewrite_log().to_string())
    };
    assert_eq!(build(), build());
}

#[test]
fn cpu_training_step_writes_its_updates_in_place() {
    let mut w = kiln::workloads::build("fmnist-mlp", Device::Cpu).unwrap();
    w.step.call(&w.args).unwrap();
    let code = w.step.generated_code();
    let lines: Vec<&str> = code.lines().filter(|l| l.starts_with("; update of shared variable")).collect();
    assert_eq!(lines.len(), 12, "{lines:?}"); // 6 parameters and 6 velocities
    assert!(lines.iter().all(|l| l.ends_with("written in place")), "{lines:#?}");
    // the swap needs the old values: not in place, and still right (see updates_use_values_from_before_the_call)
    let g = Graph::new();
    let a = g.shared("a", array![1.0f64]);
    let b = g.shared("b", array![2.0f64]);
    let mut swap = g.function([], []).updates([(&a, b.clone()), (&b, a.clone())]).compile(Device::Cpu).unwrap();
    swap.call(&[]).unwrap();
    assert_eq!((a.value().unwrap().item(), b.value().unwrap().item()), (Some(2.0), Some(1.0)));
    assert!(swap.generated_code().contains("copied in after the last step"), "{}", swap.generated_code());
}

#[test]
fn givens_of_fixed_shape_bind_the_symbolic_sizes_they_replace() {
    // Theano's idiom: the batch lives in a shared variable that replaces the symbolic input.
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("n")]);
    let n = x.shape().unwrap()[0].clone();
    let column = x.reshape_to(&[n, 1.into()]);
    let data = g.shared("data", array![1.0f32, 2.0, 3.0]);
    for device in kiln::testing::test_devices() {
        let mut f = g.function(Vec::<&Var>::new(), [&column]).givens([(&x, data.clone())]).compile(device).unwrap();
        assert_eq!(f.call1(&[]).unwrap(), Tensor::from(array![[1.0f32], [2.0], [3.0]]), "{device:?}");
    }
    // A given whose shape contradicts a fixed size is an error at compile time.
    let y = g.input("y", F32, [2]);
    let err = g.function(Vec::<&Var>::new(), [&y.exp()]).givens([(&y, data.clone())]).compile(Device::Cpu).err();
    assert!(err.expect("3 elements cannot replace f32[2]").to_string().contains("givens"));
}
