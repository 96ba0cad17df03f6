//! `Sequential`: a stack of layers that is one kiln graph. `compile` builds three functions for the
//! chosen device: the training step (forward with dropout, loss plus regularization penalties,
//! gradients, the optimizer's updates and the metrics, all one compiled function), evaluation and
//! prediction (dropout off). `fit` feeds shuffled batches to the training step, `evaluate` and
//! `predict` feed batches in order. Everything random (initial weights, dropout masks, shuffling)
//! comes from the model's seed, so the same seed trains the same model.

use super::history::{EpochLog, History};
use super::layers::Layer;
use super::losses::Loss;
use super::metrics::Metric;
use super::optimizers::Optimizer;
use super::progress::Progress;
use crate::data::{batch_ranges, shuffled_indices, take_rows};
use crate::prelude::*;
use crate::{Error, Result};
use ndarray::{ArrayD, Axis, IxDyn};
use rand::SeedableRng;

/// Options of `fit` (Keras's arguments, with its defaults).
#[derive(Clone, Debug)]
pub struct Fit {
    pub batch_size: usize,
    pub epochs: usize,
    /// Shuffle the training rows every epoch (from `seed` and the epoch number).
    pub shuffle: bool,
    pub seed: u64,
    /// Hold out this fraction of the rows (the last ones, before shuffling) for validation.
    pub validation_split: f64,
    pub validation_data: Option<(Tensor, Tensor)>,
    /// 0: silent, 1: a progress bar per epoch (plain lines when not on a terminal), 2: one line per epoch.
    pub verbose: u8,
}

impl Default for Fit {
    fn default() -> Fit {
        Fit {
            batch_size: 32,
            epochs: 1,
            shuffle: true,
            seed: 0,
            validation_split: 0.0,
            validation_data: None,
            verbose: 1,
        }
    }
}

/// A loss and metrics over a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub loss: f64,
    pub metrics: Vec<(String, f64)>,
}

impl Scores {
    /// The metric of this name (`"loss"` gives the loss).
    pub fn get(&self, name: &str) -> Option<f64> {
        if name == "loss" {
            return Some(self.loss);
        }
        self.metrics.iter().find(|(n, _)| n == name).map(|m| m.1)
    }
}

struct Compiled {
    loss: Loss,
    metrics: Vec<Metric>,
    train: Function,
    eval: Function,
    predict: Function,
}

pub struct Sequential {
    graph: Graph,
    layers: Vec<Layer>,
    names: Vec<String>,
    seed: u64,
    device: Device,
    input_shape: Option<Vec<usize>>,
    built: bool,
    compiled: Option<Compiled>,
}

impl Default for Sequential {
    fn default() -> Self {
        Sequential::new()
    }
}

impl Sequential {
    pub fn new() -> Sequential {
        Sequential {
            graph: Graph::new(),
            layers: vec![],
            names: vec![],
            seed: 0,
            device: Device::Cpu,
            input_shape: None,
            built: false,
            compiled: None,
        }
    }

    /// The seed of initial weights and dropout masks (default 0).
    pub fn seed(mut self, seed: u64) -> Sequential {
        self.seed = seed;
        self
    }

    /// Where the compiled functions run (default `Device::Cpu`).
    pub fn device(mut self, device: Device) -> Sequential {
        self.device = device;
        self
    }

    /// The shape of one example, for a first layer without `input_dim` (e.g. `[28, 28]` before a
    /// Flatten).
    pub fn input_shape(mut self, shape: &[usize]) -> Sequential {
        self.input_shape = Some(shape.to_vec());
        self
    }

    /// Appends a layer (named like Keras: `dense`, `dense_1`, `dropout`, ...).
    pub fn add(&mut self, layer: impl Into<Layer>) -> &mut Sequential {
        let layer = layer.into();
        let base = match &layer {
            Layer::Dense(d) if d.name.is_some() => d.name.clone().expect("checked"),
            other => other.kind().to_lowercase(),
        };
        let same = self.names.iter().filter(|n| *n == &base || n.starts_with(&format!("{base}_"))).count();
        self.names.push(if same == 0 { base } else { format!("{base}_{same}") });
        self.layers.push(layer);
        self.built = false;
        self.compiled = None;
        self
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
    pub fn layer_names(&self) -> &[String] {
        &self.names
    }
    /// The model's graph (for `debugprint`, `to_dot`, or building more on it).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    fn example_shape(&self) -> Result<Vec<usize>> {
        if let Some(s) = &self.input_shape {
            return Ok(s.clone());
        }
        match self.layers.first() {
            Some(Layer::Dense(d)) if d.input_dim.is_some() => Ok(vec![d.input_dim.expect("checked")]),
            Some(_) => Err(Error::Invalid(
                "the model's input shape is unknown: give the first Dense an input_dim or call input_shape".into(),
            )),
            None => Err(Error::Invalid("the model has no layers".into())),
        }
    }

    /// Shapes of one example after each layer.
    fn shapes(&self) -> Result<Vec<Vec<usize>>> {
        let mut s = self.example_shape()?;
        let mut out = vec![];
        for (l, name) in self.layers.iter().zip(&self.names) {
            s = l.output_shape(&s).map_err(|e| Error::Invalid(format!("layer '{name}': {e}")))?;
            out.push(s.clone());
        }
        Ok(out)
    }

    /// Creates every layer's parameters (once).
    pub fn build(&mut self) -> Result<()> {
        if self.built {
            return Ok(());
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let mut s = self.example_shape()?;
        for (l, name) in self.layers.iter_mut().zip(&self.names) {
            // The shape check first: it says what is wrong (a Dense on images wants a Flatten).
            let next = l.output_shape(&s).map_err(|e| Error::Invalid(format!("layer '{name}': {e}")))?;
            l.build(&self.graph, name, &s, &mut rng)?;
            s = next;
        }
        self.built = true;
        Ok(())
    }

    /// Every parameter as (`layer.kernel`/`layer.bias`, variable), in layer order.
    pub fn weights(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .zip(&self.names)
            .flat_map(|(l, n)| l.params().into_iter().map(move |(p, v)| (format!("{n}.{p}"), v)))
            .collect()
    }

    /// Keras's summary table.
    pub fn summary(&mut self) -> Result<String> {
        self.build()?;
        let shapes = self.shapes()?;
        let rule = "_".repeat(65);
        let mut s = format!(
            "Model: \"sequential\"\n{rule}\n {:<28}{:<26}{}\n{}\n",
            "Layer (type)",
            "Output Shape",
            "Param #",
            "=".repeat(65)
        );
        let mut total = 0;
        for ((l, name), shape) in self.layers.iter().zip(&self.names).zip(&shapes) {
            let count: usize = l.params().iter().map(|(_, v)| v.value().map_or(0, |t| t.len())).sum();
            total += count;
            let dims: Vec<String> =
                std::iter::once("None".to_string()).chain(shape.iter().map(|d| d.to_string())).collect();
            let shape = format!("({})", dims.join(", "));
            s.push_str(&format!(" {:<28}{:<26}{}\n", format!("{name} ({})", l.kind()), shape, thousands(count)));
        }
        s.push_str(&format!(
            "{}\nTotal params: {}\nTrainable params: {}\nNon-trainable params: 0\n{rule}\n",
            "=".repeat(65),
            thousands(total),
            thousands(total)
        ));
        Ok(s)
    }

    /// Builds the training, evaluation and prediction functions.
    pub fn compile(&mut self, loss: Loss, optimizer: Optimizer, metrics: &[Metric]) -> Result<()> {
        self.build()?;
        let g = self.graph.clone();
        let example = self.example_shape()?;
        let out_shape = self.shapes()?.last().cloned().ok_or_else(|| Error::Invalid("no layers".into()))?;
        let mut dims: Vec<Dim> = vec![Dim::sym("batch")];
        dims.extend(example.iter().map(|&d| Dim::Fixed(d)));
        let x = g.input("x", F32, dims);
        let y = if loss.sparse_targets() {
            g.input("y", I64, [Dim::sym("batch")])
        } else {
            let mut d = vec![Dim::sym("batch")];
            d.extend(out_shape.iter().map(|&n| Dim::Fixed(n)));
            g.input("y", F32, d)
        };
        let rng = g.rng(self.seed.wrapping_add(0x5eed));
        let forward = |training: bool| self.layers.iter().fold(x.clone(), |h, l| l.forward(&h, training, &rng));
        let (train_pred, pred) = (forward(true), forward(false));
        let penalty = self.layers.iter().filter_map(|l| l.penalty()).reduce(|a, b| a + b);
        let with_penalty = |l: Var| match &penalty {
            Some(p) => l + p,
            None => l,
        };
        let train_loss = with_penalty(loss.batch_mean(&train_pred, &y));
        let eval_loss = with_penalty(loss.batch_mean(&pred, &y));
        let params: Vec<Var> = self.weights().into_iter().map(|(_, v)| v).collect();
        let grads = g.grad_with(&train_loss, &params.iter().collect::<Vec<_>>(), Disconnected::Raise)?;
        let updates = optimizer.updates(&g, &params, &grads)?;
        let mut train_out = vec![train_loss];
        train_out.extend(metrics.iter().map(|m| m.batch_mean(loss, &train_pred, &y)));
        let mut eval_out = vec![eval_loss];
        eval_out.extend(metrics.iter().map(|m| m.batch_mean(loss, &pred, &y)));
        let train = g
            .function([&x, &y], train_out.iter())
            .updates(updates.iter().map(|(p, v)| (p, v.clone())))
            .compile(self.device)?;
        let eval = g.function([&x, &y], eval_out.iter()).compile(self.device)?;
        let predict = g.function([&x], [&pred]).compile(self.device)?;
        self.compiled = Some(Compiled { loss, metrics: metrics.to_vec(), train, eval, predict });
        Ok(())
    }

    fn compiled(&mut self) -> Result<&mut Compiled> {
        self.compiled.as_mut().ok_or_else(|| Error::Invalid("call compile(loss, optimizer, metrics) first".into()))
    }

    /// The training step function (for `debugprint`, `generated_code` and friends).
    pub fn train_function(&mut self) -> Result<&Function> {
        Ok(&self.compiled()?.train)
    }
    /// The optimized training step, Theano-style (after `compile`).
    pub fn debugprint(&mut self) -> Result<String> {
        Ok(self.compiled()?.train.debugprint())
    }
    /// The optimized training step as GraphViz DOT (after `compile`).
    pub fn to_dot(&mut self) -> Result<String> {
        Ok(self.compiled()?.train.to_dot())
    }
    /// The code generated for the training step so far (CLIF or CUDA C; after a `fit`).
    pub fn generated_code(&mut self) -> Result<String> {
        Ok(self.compiled()?.train.generated_code())
    }

    /// Autotunes the training step on its CUDA device for batches shaped as `x` and `y` (one
    /// batch: `Function::autotune`, which leaves the weights as they were); later `fit` calls
    /// with that batch size run the fastest setting found. An `Err` off the CUDA backend.
    pub fn autotune(&mut self, x: &Tensor, y: &Tensor, opts: &crate::AutotuneOptions) -> Result<crate::AutotuneReport> {
        let loss = self.compiled()?.loss;
        let (x, y) = (x.cast(F32), Self::targets(loss, y));
        check_rows(&x, &y)?;
        self.compiled()?.train.autotune(&[x, y], opts)
    }

    /// Targets as the model's `y` input wants them (i64 class indices for sparse losses).
    fn targets(loss: Loss, y: &Tensor) -> Tensor {
        if loss.sparse_targets() {
            y.cast(I64)
        } else {
            y.cast(F32)
        }
    }

    /// Trains for `opts.epochs` epochs and returns the per-epoch history.
    pub fn fit(&mut self, x: &Tensor, y: &Tensor, opts: &Fit) -> Result<History> {
        let loss = self.compiled()?.loss;
        let (x, y) = (x.cast(F32), Self::targets(loss, y));
        check_rows(&x, &y)?;
        let n = x.shape()[0];
        let (train_n, validation) = match (&opts.validation_data, opts.validation_split) {
            (Some((vx, vy)), _) => (n, Some((vx.cast(F32), Self::targets(loss, vy)))),
            (None, s) if s > 0.0 => {
                let held = ((n as f64) * s).round() as usize;
                let rows: Vec<usize> = (n - held..n).collect();
                (n - held, Some((rows_of(&x, &rows), rows_of(&y, &rows))))
            }
            _ => (n, None),
        };
        if train_n == 0 {
            return Err(Error::Invalid("no training rows left after the validation split".into()));
        }
        let names: Vec<String> = self.compiled()?.metrics.iter().map(|m| m.name().to_string()).collect();
        let mut history = History { epochs: vec![], metric_names: names.clone() };
        for epoch in 0..opts.epochs {
            let start = std::time::Instant::now();
            let order: Vec<usize> = if opts.shuffle {
                shuffled_indices(train_n, opts.seed.wrapping_add(epoch as u64))
            } else {
                (0..train_n).collect()
            };
            let batches: Vec<(usize, usize)> = batch_ranges(train_n, opts.batch_size).collect();
            let mut progress = Progress::new(epoch, opts.epochs, batches.len(), opts.verbose);
            let mut sums = vec![0.0; names.len() + 1];
            let mut seen = 0usize;
            for (b, &(lo, hi)) in batches.iter().enumerate() {
                let rows = &order[lo..hi];
                let out = self.compiled()?.train.call(&[rows_of(&x, rows), rows_of(&y, rows)])?;
                add_weighted(&mut sums, &out, hi - lo);
                seen += hi - lo;
                if progress.is_live() {
                    let means: Vec<f64> = sums.iter().map(|s| s / seen as f64).collect();
                    progress.update(b + 1, &named(&means, &names));
                }
            }
            let means: Vec<f64> = sums.iter().map(|s| s / seen as f64).collect();
            let val = match &validation {
                Some((vx, vy)) => Some(self.evaluate_inner(vx, vy, opts.batch_size)?),
                None => None,
            };
            let log = EpochLog {
                loss: means[0],
                metrics: names.iter().cloned().zip(means[1..].iter().copied()).collect(),
                val: val.clone(),
                seconds: start.elapsed().as_secs_f64(),
            };
            progress.finish(&log);
            history.epochs.push(log);
        }
        Ok(history)
    }

    fn evaluate_inner(&mut self, x: &Tensor, y: &Tensor, batch_size: usize) -> Result<Scores> {
        check_rows(x, y)?;
        let n = x.shape()[0];
        let names: Vec<String> = self.compiled()?.metrics.iter().map(|m| m.name().to_string()).collect();
        let mut sums = vec![0.0; names.len() + 1];
        for (lo, hi) in batch_ranges(n, batch_size) {
            let rows: Vec<usize> = (lo..hi).collect();
            let out = self.compiled()?.eval.call(&[rows_of(x, &rows), rows_of(y, &rows)])?;
            add_weighted(&mut sums, &out, hi - lo);
        }
        let means: Vec<f64> = sums.iter().map(|s| s / n.max(1) as f64).collect();
        Ok(Scores { loss: means[0], metrics: names.into_iter().zip(means[1..].iter().copied()).collect() })
    }

    /// The loss and metrics over `(x, y)`, in batches, with dropout off.
    pub fn evaluate(&mut self, x: &Tensor, y: &Tensor, batch_size: usize) -> Result<Scores> {
        let loss = self.compiled()?.loss;
        self.evaluate_inner(&x.cast(F32), &Self::targets(loss, y), batch_size)
    }

    /// The model's outputs for `x`, in batches, with dropout off.
    pub fn predict(&mut self, x: &Tensor, batch_size: usize) -> Result<Tensor> {
        let x = x.cast(F32);
        let n = x.shape()[0];
        let mut parts: Vec<ArrayD<f32>> = vec![];
        for (lo, hi) in batch_ranges(n, batch_size) {
            let rows: Vec<usize> = (lo..hi).collect();
            let out = self.compiled()?.predict.call1(&[rows_of(&x, &rows)])?;
            match out {
                Tensor::F32(a) => parts.push(a),
                other => return Err(Error::Invalid(format!("predict produced {}", other.dtype()))),
            }
        }
        let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
        let joined = if views.is_empty() {
            ArrayD::<f32>::zeros(IxDyn(&[0]))
        } else {
            ndarray::concatenate(Axis(0), &views).map_err(|e| Error::Invalid(format!("joining batches: {e}")))?
        };
        Ok(Tensor::F32(joined))
    }
}

fn check_rows(x: &Tensor, y: &Tensor) -> Result<()> {
    if x.shape().is_empty() || y.shape().is_empty() || x.shape()[0] != y.shape()[0] {
        return Err(Error::Invalid(format!(
            "x has shape {:?} but y has {:?}: one row of each per example",
            x.shape(),
            y.shape()
        )));
    }
    Ok(())
}

/// Adds a batch's scalar outputs (loss, metrics), weighted by its row count, so that dividing by
/// the rows seen gives the per-example mean, as Keras reports it.
fn add_weighted(sums: &mut [f64], outputs: &[Tensor], rows: usize) {
    for (s, v) in sums.iter_mut().zip(outputs) {
        *s += v.item().unwrap_or(f64::NAN) * rows as f64;
    }
}

/// The rows `rows` of a tensor.
fn rows_of(t: &Tensor, rows: &[usize]) -> Tensor {
    kiln_ir::map_array!(t, a => take_rows(a, rows))
}

/// `[("loss", v0), (names[i], v[i+1])...]`.
fn named(values: &[f64], names: &[String]) -> Vec<(String, f64)> {
    let mut out = vec![("loss".to_string(), values.first().copied().unwrap_or(f64::NAN))];
    out.extend(names.iter().cloned().zip(values.iter().skip(1).copied()));
    out
}

/// 1234567 -> "1,234,567".
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
