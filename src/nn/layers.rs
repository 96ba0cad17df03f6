//! Layers: each builds its fragment of the model's graph. `Dense` owns a kernel (and a bias) as
//! shared variables, created when the model is built (the input size is known then); the others
//! have no parameters. Dropout is active only in the training function (inverted: kept units are
//! scaled by 1/(1-rate), so nothing changes at evaluation).

use super::activations::Activation;
use super::initializers::Initializer;
use crate::prelude::*;
use crate::Result;
use rand::rngs::StdRng;

/// A penalty on a kernel, added to the training loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Regularizer {
    /// `l2 * sum(w^2)`
    L2(f64),
    /// `l1 * sum(|w|)`
    L1(f64),
}

impl Regularizer {
    pub fn penalty(self, w: &Var) -> Var {
        match self {
            Regularizer::L2(l) => (w * w).sum_all() * l,
            Regularizer::L1(l) => w.abs().sum_all() * l,
        }
    }
}

/// A fully connected layer: `activation(x @ kernel + bias)`.
#[derive(Clone, Debug)]
pub struct Dense {
    pub units: usize,
    pub input_dim: Option<usize>,
    pub activation: Activation,
    pub use_bias: bool,
    pub kernel_initializer: Initializer,
    pub bias_initializer: Initializer,
    pub kernel_regularizer: Option<Regularizer>,
    pub name: Option<String>,
    pub(crate) kernel: Option<Var>,
    pub(crate) bias: Option<Var>,
}

impl Dense {
    /// Keras's defaults: linear, with bias, Glorot-uniform kernel, zero bias.
    pub fn new(units: usize) -> Dense {
        Dense {
            units,
            input_dim: None,
            activation: Activation::Linear,
            use_bias: true,
            kernel_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
            kernel_regularizer: None,
            name: None,
            kernel: None,
            bias: None,
        }
    }
    pub fn input_dim(mut self, n: usize) -> Dense {
        self.input_dim = Some(n);
        self
    }
    pub fn activation(mut self, a: Activation) -> Dense {
        self.activation = a;
        self
    }
    pub fn use_bias(mut self, b: bool) -> Dense {
        self.use_bias = b;
        self
    }
    pub fn kernel_initializer(mut self, i: Initializer) -> Dense {
        self.kernel_initializer = i;
        self
    }
    pub fn bias_initializer(mut self, i: Initializer) -> Dense {
        self.bias_initializer = i;
        self
    }
    pub fn kernel_regularizer(mut self, r: Regularizer) -> Dense {
        self.kernel_regularizer = Some(r);
        self
    }
    pub fn name(mut self, n: &str) -> Dense {
        self.name = Some(n.to_string());
        self
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub rate: f64,
}

impl Dropout {
    pub fn new(rate: f64) -> Dropout {
        Dropout { rate }
    }
}

/// Collapses every axis after the batch axis into one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flatten;

#[derive(Clone, Debug)]
pub enum Layer {
    Dense(Box<Dense>),
    Activation(Activation),
    Dropout(Dropout),
    Flatten(Flatten),
}

impl From<Dense> for Layer {
    fn from(d: Dense) -> Layer {
        Layer::Dense(Box::new(d))
    }
}
impl From<Activation> for Layer {
    fn from(a: Activation) -> Layer {
        Layer::Activation(a)
    }
}
impl From<Dropout> for Layer {
    fn from(d: Dropout) -> Layer {
        Layer::Dropout(d)
    }
}
impl From<Flatten> for Layer {
    fn from(f: Flatten) -> Layer {
        Layer::Flatten(f)
    }
}

impl Layer {
    /// The Keras class name.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Dense(_) => "Dense",
            Layer::Activation(_) => "Activation",
            Layer::Dropout(_) => "Dropout",
            Layer::Flatten(_) => "Flatten",
        }
    }

    /// The shape of one example after this layer.
    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        match self {
            Layer::Dense(d) => {
                if input.len() != 1 {
                    return Err(crate::Error::Invalid(format!(
                        "Dense({}) takes one axis per example, got {input:?} (add a Flatten before it)",
                        d.units
                    )));
                }
                Ok(vec![d.units])
            }
            Layer::Flatten(_) => Ok(vec![input.iter().product()]),
            _ => Ok(input.to_vec()),
        }
    }

    /// Creates this layer's parameters (named `{name}.kernel`, `{name}.bias`) for inputs of `input`.
    pub(crate) fn build(&mut self, g: &Graph, name: &str, input: &[usize], rng: &mut StdRng) -> Result<()> {
        if let Layer::Dense(d) = self {
            let fan_in = input[0];
            if let Some(n) = d.input_dim {
                if n != fan_in {
                    return Err(crate::Error::Invalid(format!(
                        "layer '{name}' declares input_dim {n} but gets {fan_in}"
                    )));
                }
            }
            let k = d.kernel_initializer.sample(&[fan_in, d.units], fan_in, d.units, rng);
            d.kernel = Some(g.shared(&format!("{name}.kernel"), k));
            if d.use_bias {
                let b = d.bias_initializer.sample(&[d.units], fan_in, d.units, rng);
                d.bias = Some(g.shared(&format!("{name}.bias"), b));
            }
        }
        Ok(())
    }

    /// The layer applied to `x` (`training` turns dropout on).
    pub(crate) fn forward(&self, x: &Var, training: bool, rng: &RandomStream) -> Var {
        match self {
            Layer::Dense(d) => {
                let k = d.kernel.as_ref().expect("built before use");
                let z = x.matmul(k);
                let z = match &d.bias {
                    Some(b) => z + b,
                    None => z,
                };
                d.activation.apply(&z)
            }
            Layer::Activation(a) => a.apply(x),
            Layer::Dropout(d) if training && d.rate > 0.0 => x.dropout(d.rate, rng),
            Layer::Dropout(_) => x.clone(),
            Layer::Flatten(_) => x.flatten(),
        }
    }

    /// (name, variable) of each parameter: `kernel`, then `bias`.
    pub fn params(&self) -> Vec<(&'static str, Var)> {
        match self {
            Layer::Dense(d) => {
                let mut p = vec![];
                if let Some(k) = &d.kernel {
                    p.push(("kernel", k.clone()));
                }
                if let Some(b) = &d.bias {
                    p.push(("bias", b.clone()));
                }
                p
            }
            _ => vec![],
        }
    }

    /// The layer's penalty term, if it has a regularizer.
    pub(crate) fn penalty(&self) -> Option<Var> {
        match self {
            Layer::Dense(d) => match (&d.kernel_regularizer, &d.kernel) {
                (Some(r), Some(k)) => Some(r.penalty(k)),
                _ => None,
            },
            _ => None,
        }
    }
}
