//! The standard training-step workloads, written as plain kiln graphs (no layer API), shared by the
//! step benchmark (`cargo bench --bench steps`) and the backend-agreement tests. Each is a full
//! training step: forward, loss, gradients and the optimizer's updates of shared variables, in f32.
//!
//! - `keras-mlp`: Dense(64, relu, input 20) -> Dropout(0.5) -> Dense(10) softmax, categorical
//!   cross-entropy, SGD, batch 16.
//! - `fmnist-mlp`: 784-256-256-10 ReLU MLP, softmax cross-entropy on integer labels, SGD with
//!   momentum 0.9, batch 128 (`fmnist-mlp-4k`: batch 4096).
//! - `autoencoder`: 784-1000-500-250-30-250-500-1000-784, sigmoid everywhere, squared error, SGD,
//!   batch 128.

use crate::prelude::*;
use crate::testing::splitmix;
use crate::{Result, Tensor};

pub const NAMES: [&str; 4] = ["keras-mlp", "fmnist-mlp", "fmnist-mlp-4k", "autoencoder"];

/// A compiled training step and one batch of synthetic data for it.
pub struct Workload {
    pub name: String,
    pub batch: usize,
    pub graph: Graph,
    pub step: Function,
    /// The step's arguments (none: the batch is in `batch_vars`).
    pub args: Vec<Tensor>,
    /// Shared variables holding the batch (inputs, then labels where there are any).
    pub batch_vars: Vec<Var>,
    /// The parameters (and optimizer state), for comparing backends.
    pub params: Vec<Var>,
    /// Seconds spent building the graph and compiling the step (without a shape specialization).
    pub build_seconds: f64,
}

fn glorot(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let scale = (6.0 / (rows + cols) as f64).sqrt();
    let mut r = splitmix(seed);
    Array2::from_shape_fn((rows, cols), |_| ((r() * 2.0 - 1.0) * scale) as f32)
}

fn data(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut r = splitmix(seed);
    Array2::from_shape_fn((rows, cols), |_| r() as f32).into()
}

struct Dense {
    w: Var,
    b: Var,
}

fn dense(g: &Graph, name: &str, fan_in: usize, units: usize, seed: u64) -> Dense {
    Dense {
        w: g.shared(&format!("{name}.w"), glorot(fan_in, units, seed)),
        b: g.shared(&format!("{name}.b"), Array1::<f32>::zeros(units)),
    }
}

impl Dense {
    fn apply(&self, x: &Var) -> Var {
        x.matmul(&self.w) + &self.b
    }
}

/// What each workload's builder returns: its graph's pieces before compiling.
struct Parts {
    batch: usize,
    cost: Var,
    inputs: Vec<Var>,
    args: Vec<Tensor>,
    params: Vec<Var>,
    updates: Vec<(Var, Var)>,
}

/// Builds and compiles the named workload (batch size from the name) for `device`.
pub fn build(name: &str, device: Device) -> Result<Workload> {
    let start = std::time::Instant::now();
    let g = Graph::new();
    let Parts { batch, cost, inputs, args, params, updates } = match name {
        "keras-mlp" => {
            let b = 16;
            let x = g.input("x", F32, [Dim::sym("batch"), 20.into()]);
            let y = g.input("y", F32, [Dim::sym("batch"), 10.into()]);
            let rng = g.rng(1);
            let (l1, l2) = (dense(&g, "dense1", 20, 64, 1), dense(&g, "dense2", 64, 10, 2));
            let h = l1.apply(&x).relu().dropout(0.5, &rng);
            let cost = l2.apply(&h).softmax(-1).categorical_crossentropy(&y).mean_all();
            let params = vec![l1.w, l1.b, l2.w, l2.b];
            let grads = g.grad_with(&cost, &params.iter().collect::<Vec<_>>(), Disconnected::Raise)?;
            let updates = params.iter().zip(grads).map(|(p, gp)| (p.clone(), p - 0.01 * gp)).collect();
            let mut r = splitmix(9);
            let labels =
                Array2::from_shape_fn(
                    (b, 10),
                    |(i, j)| if (i * 7 + (r() * 3.0) as usize) % 10 == j { 1.0f32 } else { 0.0 },
                );
            Parts { batch: b, cost, inputs: vec![x, y], args: vec![data(b, 20, 3), labels.into()], params, updates }
        }
        "fmnist-mlp" | "fmnist-mlp-4k" => {
            let b = if name == "fmnist-mlp" { 128 } else { 4096 };
            let x = g.input("x", F32, [Dim::sym("batch"), 784.into()]);
            let y = g.input("y", I64, [Dim::sym("batch")]);
            let ls =
                [dense(&g, "dense1", 784, 256, 1), dense(&g, "dense2", 256, 256, 2), dense(&g, "dense3", 256, 10, 3)];
            let h = ls[1].apply(&ls[0].apply(&x).relu()).relu();
            let cost = ls[2].apply(&h).softmax(-1).sparse_categorical_crossentropy(&y).mean_all();
            let params: Vec<Var> = ls.iter().flat_map(|l| [l.w.clone(), l.b.clone()]).collect();
            let grads = g.grad_with(&cost, &params.iter().collect::<Vec<_>>(), Disconnected::Raise)?;
            let mut updates = vec![];
            let mut state = params.clone();
            for (p, gp) in params.iter().zip(grads) {
                let v = g.shared(
                    &format!("{}.velocity", p.name().unwrap_or_default()),
                    Tensor::zeros(F32, p.value()?.shape()),
                );
                let v_new = &v * 0.9 - 0.01 * gp;
                updates.push((p.clone(), p + &v_new));
                updates.push((v.clone(), v_new));
                state.push(v);
            }
            let labels = Array1::from_shape_fn(b, |i| ((i * 7) % 10) as i64);
            Parts {
                batch: b,
                cost,
                inputs: vec![x, y],
                args: vec![data(b, 784, 4), labels.into()],
                params: state,
                updates,
            }
        }
        "autoencoder" => {
            let b = 128;
            let x = g.input("x", F32, [Dim::sym("batch"), 784.into()]);
            let sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784];
            let layers: Vec<Dense> = sizes
                .windows(2)
                .enumerate()
                .map(|(i, w)| dense(&g, &format!("dense{}", i + 1), w[0], w[1], i as u64 + 1))
                .collect();
            let mut h = x.clone();
            for l in &layers {
                h = l.apply(&h).sigmoid();
            }
            let d = &h - &x;
            let cost = (&d * &d).mean_all();
            let params: Vec<Var> = layers.iter().flat_map(|l| [l.w.clone(), l.b.clone()]).collect();
            let grads = g.grad_with(&cost, &params.iter().collect::<Vec<_>>(), Disconnected::Raise)?;
            let updates = params.iter().zip(grads).map(|(p, gp)| (p.clone(), p - 0.1 * gp)).collect();
            Parts { batch: b, cost, inputs: vec![x], args: vec![data(b, 784, 5)], params, updates }
        }
        other => {
            return Err(crate::Error::Invalid(format!("unknown workload '{other}' (known: {})", NAMES.join(", "))))
        }
    };
    // The batch lives in shared variables that replace the inputs (Theano's way of keeping data on
    // the device): a step then measures the training step itself, as the peers' steps, whose
    // batches are already on the GPU, do. A new batch is a `set_value` away.
    let batch_vars: Vec<Var> =
        inputs.iter().zip(args).map(|(x, a)| g.shared(&format!("batch.{}", x.name().unwrap_or_default()), a)).collect();
    let step = g
        .function(Vec::<&Var>::new(), [&cost])
        .givens(inputs.iter().zip(&batch_vars).map(|(x, s)| (x, s.clone())))
        .updates(updates.iter().map(|(p, v)| (p, v.clone())))
        .compile(device)?;
    let build_seconds = start.elapsed().as_secs_f64();
    Ok(Workload { name: name.to_string(), batch, graph: g, step, args: vec![], batch_vars, params, build_seconds })
}
