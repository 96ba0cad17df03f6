//! Keras's activations, as graph expressions.

use crate::var::Var;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Linear,
    Sigmoid,
    Tanh,
    Relu,
    /// Over the last axis.
    Softmax,
    Softplus,
}

impl Activation {
    pub fn apply(self, x: &Var) -> Var {
        match self {
            Activation::Linear => x.clone(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Tanh => x.tanh(),
            Activation::Relu => x.relu(),
            Activation::Softmax => x.softmax(-1),
            Activation::Softplus => x.softplus(),
        }
    }
    /// Keras's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Relu => "relu",
            Activation::Softmax => "softmax",
            Activation::Softplus => "softplus",
        }
    }
}
