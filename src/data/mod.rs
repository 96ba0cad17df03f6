//! Datasets and the helpers to feed them: the IDX reader, Fashion-MNIST, one-hot labels, and
//! seeded shuffling and batching of rows.

pub mod fashion_mnist;
pub mod idx;

use ndarray::{Array1, Array2, ArrayD, Axis};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A permutation of `0..n` from a seed (the same seed, the same order).
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    idx
}

/// `[start, end)` ranges covering `0..n` in batches of `batch` (the last may be shorter).
pub fn batch_ranges(n: usize, batch: usize) -> impl Iterator<Item = (usize, usize)> {
    let batch = batch.max(1);
    (0..n.div_ceil(batch)).map(move |b| (b * batch, ((b + 1) * batch).min(n)))
}

/// The rows `idx` of `a`, in that order.
pub fn take_rows<T: Clone>(a: &ArrayD<T>, idx: &[usize]) -> ArrayD<T> {
    a.select(Axis(0), idx)
}

/// One-hot rows (`classes` columns) of class indices.
pub fn one_hot(labels: &Array1<i64>, classes: usize) -> Array2<f32> {
    Array2::from_shape_fn((labels.len(), classes), |(i, c)| if labels[i] == c as i64 { 1.0 } else { 0.0 })
}
