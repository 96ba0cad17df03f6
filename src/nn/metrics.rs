//! Metrics. `Metric::Accuracy` means what Keras's `'accuracy'` means: the kind of accuracy follows
//! from the loss (binary for binary cross-entropy, class indices for sparse targets, arg-max of
//! one-hot targets otherwise).

use super::losses::Loss;
use crate::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Accuracy,
    BinaryAccuracy,
    CategoricalAccuracy,
    SparseCategoricalAccuracy,
}

impl Metric {
    /// The name shown in progress lines and `History` (Keras's).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::BinaryAccuracy => "binary_accuracy",
            Metric::CategoricalAccuracy => "categorical_accuracy",
            Metric::SparseCategoricalAccuracy => "sparse_categorical_accuracy",
        }
    }

    fn resolve(self, loss: Loss) -> Metric {
        match (self, loss) {
            (Metric::Accuracy, Loss::BinaryCrossentropy) => Metric::BinaryAccuracy,
            (Metric::Accuracy, Loss::SparseCategoricalCrossentropy) => Metric::SparseCategoricalAccuracy,
            (Metric::Accuracy, _) => Metric::CategoricalAccuracy,
            (m, _) => m,
        }
    }

    /// The batch mean of the metric.
    pub fn batch_mean(self, loss: Loss, pred: &Var, target: &Var) -> Var {
        let hits = match self.resolve(loss) {
            Metric::BinaryAccuracy => pred.gt(0.5).eq(target.gt(0.5)),
            Metric::SparseCategoricalAccuracy => pred.argmax(-1).eq(target),
            _ => pred.argmax(-1).eq(target.argmax(-1)),
        };
        hits.cast(F32).mean_all()
    }
}
