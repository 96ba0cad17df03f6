//! Keras's losses, averaged over the batch. Each is written in its textbook form (log of a
//! probability); the rewrite pipeline turns log(softmax) and log(sigmoid) into their stable forms,
//! so a softmax output layer with cross-entropy never takes the log of an underflowed zero.

use crate::var::Var;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Targets in {0, 1} (or [0, 1]), predictions probabilities; averaged over the last axis.
    BinaryCrossentropy,
    /// One-hot targets, predictions a distribution over the last axis.
    CategoricalCrossentropy,
    /// Integer class targets (i64), predictions a distribution over the last axis.
    SparseCategoricalCrossentropy,
    /// Mean over the last axis of the squared difference.
    MeanSquaredError,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::BinaryCrossentropy => "binary_crossentropy",
            Loss::CategoricalCrossentropy => "categorical_crossentropy",
            Loss::SparseCategoricalCrossentropy => "sparse_categorical_crossentropy",
            Loss::MeanSquaredError => "mean_squared_error",
        }
    }

    /// Whether targets are class indices (i64) rather than values shaped like the predictions.
    pub fn sparse_targets(self) -> bool {
        self == Loss::SparseCategoricalCrossentropy
    }

    /// The per-example loss (one value per row of the batch).
    pub fn per_example(self, pred: &Var, target: &Var) -> Var {
        match self {
            Loss::BinaryCrossentropy => pred.binary_crossentropy(target).mean(&[-1]),
            Loss::CategoricalCrossentropy => pred.categorical_crossentropy(target),
            Loss::SparseCategoricalCrossentropy => pred.sparse_categorical_crossentropy(target),
            Loss::MeanSquaredError => {
                let d = pred - target;
                (&d * &d).mean(&[-1])
            }
        }
    }

    /// The batch mean of the per-example loss.
    pub fn batch_mean(self, pred: &Var, target: &Var) -> Var {
        self.per_example(pred, target).mean_all()
    }
}
