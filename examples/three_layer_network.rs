//! The lecture's first models, in kiln: a single sigmoid neuron, which learns OR but cannot learn
//! XOR, and a 3-layer sigmoid network, which learns XOR. Both are trained by full-batch gradient
//! descent on binary cross-entropy; the loss is printed as it falls, and the optimized training
//! graph at the end.
//!
//! Run: `cargo run --release --example three_layer_network`

use kiln::prelude::*;

/// Small deterministic weights: uniform in [-scale, scale) from a fixed seed.
fn init(shape: (usize, usize), scale: f64, seed: u64) -> Array2<f32> {
    let mut next = kiln::testing::splitmix(seed);
    Array2::from_shape_fn(shape, |_| ((next() * 2.0 - 1.0) * scale) as f32)
}

/// A sigmoid layer `sigmoid(x W + b)` with its parameters as shared variables.
fn dense(g: &Graph, x: &Var, name: &str, inputs: usize, units: usize, seed: u64) -> (Var, [Var; 2]) {
    let scale = (6.0 / (inputs + units) as f64).sqrt(); // Glorot/Xavier uniform
    let w = g.shared(&format!("{name}.w"), init((inputs, units), scale, seed));
    let b = g.shared(&format!("{name}.b"), Array1::<f32>::zeros(units));
    ((x.matmul(&w) + &b).sigmoid(), [w, b])
}

/// A model to train: inputs, targets, prediction and parameters.
struct Model<'a> {
    g: &'a Graph,
    x: &'a Var,
    y: &'a Var,
    p: &'a Var,
    params: &'a [Var],
}

/// Trains the model on (xs, ys) by gradient descent; returns the compiled training step.
fn train(m: Model, data: (&Array2<f32>, &Array2<f32>), lr: f64, steps: usize) -> kiln::Result<Function> {
    let Model { g, x, y, p, params } = m;
    let cost = p.binary_crossentropy(y).mean_all();
    let grads = g.grad_with(&cost, &params.iter().collect::<Vec<_>>(), Disconnected::Raise)?;
    let updates: Vec<(&Var, Var)> = params.iter().zip(grads).map(|(w, gw)| (w, w - lr * gw)).collect();
    let mut step = g.function([x, y], [&cost]).updates(updates).compile(Device::Cpu)?;
    for i in 0..=steps {
        let loss = step.call1(&[data.0.clone().into(), data.1.clone().into()])?.item().unwrap_or(f64::NAN);
        if i % (steps / 8) == 0 {
            println!("  step {i:>5}  loss {loss:.4}");
        }
    }
    Ok(step)
}

fn report(g: &Graph, x: &Var, p: &Var, xs: &Array2<f32>, ys: &Array2<f32>) -> kiln::Result<usize> {
    let mut predict = g.function([x], [p]).compile(Device::Cpu)?;
    let probs = predict.call1(&[xs.clone().into()])?.to_f64_vec();
    let mut correct = 0;
    for (i, p) in probs.iter().enumerate() {
        let hit = (*p > 0.5) == (ys[[i, 0]] > 0.5);
        correct += hit as usize;
        println!("  {:?} -> {p:.3} (target {})", xs.row(i).to_vec(), ys[[i, 0]]);
    }
    Ok(correct)
}

fn main() -> kiln::Result<()> {
    let xs = array![[0.0f32, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]];
    let or = array![[0.0f32], [1.0], [1.0], [1.0]];
    let xor = array![[0.0f32], [1.0], [1.0], [0.0]];

    for (task, ys) in [("OR", &or), ("XOR", &xor)] {
        println!("single sigmoid neuron on {task}:");
        let g = Graph::new();
        let x = g.input("x", F32, [Dim::sym("batch"), 2.into()]);
        let y = g.input("y", F32, [Dim::sym("batch"), 1.into()]);
        let (p, params) = dense(&g, &x, "neuron", 2, 1, 1);
        train(Model { g: &g, x: &x, y: &y, p: &p, params: &params }, (&xs, ys), 1.0, 2000)?;
        let correct = report(&g, &x, &p, &xs, ys)?;
        println!("  {correct}/4 correct{}\n", if task == "XOR" { " (XOR is not linearly separable)" } else { "" });
    }

    println!("3-layer sigmoid network (2-8-8-1) on XOR:");
    let g = Graph::new();
    let x = g.input("x", F32, [Dim::sym("batch"), 2.into()]);
    let y = g.input("y", F32, [Dim::sym("batch"), 1.into()]);
    let (h1, p1) = dense(&g, &x, "hidden1", 2, 8, 2);
    let (h2, p2) = dense(&g, &h1, "hidden2", 8, 8, 3);
    let (p, p3) = dense(&g, &h2, "output", 8, 1, 4);
    let params: Vec<Var> = p1.into_iter().chain(p2).chain(p3).collect();
    let step = train(Model { g: &g, x: &x, y: &y, p: &p, params: &params }, (&xs, &xor), 2.0, 4000)?;
    let correct = report(&g, &x, &p, &xs, &xor)?;
    println!("  {correct}/4 correct\n");
    println!("optimized training step (forward, loss, gradients, updates):");
    print!("{}", step.debugprint());
    println!("rewrites:\n{}", step.rewrite_log());
    if correct != 4 {
        return Err(kiln::Error::Invalid("the 3-layer network did not learn XOR".into()));
    }
    Ok(())
}
