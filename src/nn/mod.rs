//! `kiln::nn`: the Keras-style layer API on top of kiln graphs. A `Sequential` model is a graph:
//! its layers add nodes, its weights are shared variables, and `compile` turns the training step
//! (forward, loss, gradients, optimizer updates, metrics) into one compiled kiln function for the
//! chosen device, so `debugprint`, `to_dot` and `generated_code` work on it as on any function.
//!
//! ```no_run
//! use kiln::nn::*;
//! let mut model = Sequential::new();
//! model.add(Dense::new(64).input_dim(20).activation(Activation::Relu));
//! model.add(Dropout::new(0.5));
//! model.add(Dense::new(10).activation(Activation::Softmax));
//! model.compile(Loss::CategoricalCrossentropy, Optimizer::sgd(0.01), &[Metric::Accuracy]).unwrap();
//! ```

pub mod activations;
pub mod history;
pub mod initializers;
pub mod layers;
pub mod losses;
pub mod metrics;
pub mod model;
pub mod optimizers;
mod progress;
mod weights;

pub use activations::Activation;
pub use history::{EpochLog, History};
pub use initializers::Initializer;
pub use layers::{Dense, Dropout, Flatten, Layer, Regularizer};
pub use losses::Loss;
pub use metrics::Metric;
pub use model::{Fit, Scores, Sequential};
pub use optimizers::Optimizer;
