//! Random streams: `Graph::rng(seed)` gives a `RandomStream` whose state is a shared variable
//! `[seed, call]`. Each draw is a random node with its own stream id; every call of a compiled
//! function that draws advances `call` by one, so the numbers differ per call, replay from the seed,
//! and are the same on every backend (Philox 4x32-10, defined in kiln-ir).

use crate::var::Var;
use kiln_ir::ops::{Distribution, Op, RandomOp};
use kiln_ir::{DType, Dim};
use std::panic::Location;

#[derive(Clone)]
pub struct RandomStream {
    pub(crate) state: Var,
}

impl RandomStream {
    /// The shared variable holding `[seed, call]`.
    pub fn state(&self) -> &Var {
        &self.state
    }
    #[track_caller]
    fn draw(&self, dist: Distribution, dtype: DType, shape: &[Dim]) -> Var {
        let stream = self.state.graph.state.borrow_mut().ir.new_stream();
        let op = Op::Random(RandomOp { dist, dtype, shape: shape.to_vec(), stream });
        self.state.apply(op, &[], Location::caller())
    }
    /// Uniform numbers in [low, high).
    #[track_caller]
    pub fn uniform(&self, shape: &[Dim], low: f64, high: f64, dtype: DType) -> Var {
        self.draw(Distribution::Uniform { low, high }, dtype, shape)
    }
    /// Normal numbers with the given mean and standard deviation.
    #[track_caller]
    pub fn normal(&self, shape: &[Dim], mean: f64, std: f64, dtype: DType) -> Var {
        self.draw(Distribution::Normal { mean, std }, dtype, shape)
    }
    /// 1 with probability `p`, else 0 (in `dtype`, which may be bool).
    #[track_caller]
    pub fn bernoulli(&self, shape: &[Dim], p: f64, dtype: DType) -> Var {
        self.draw(Distribution::Bernoulli { p }, dtype, shape)
    }
}

impl Var {
    /// Inverted dropout: zeroes each element with probability `rate` and scales the rest by
    /// `1 / (1 - rate)`, so the expectation is unchanged.
    #[track_caller]
    pub fn dropout(&self, rate: f64, rng: &RandomStream) -> Var {
        let (Ok(shape), Ok(dtype)) = (self.shape(), self.dtype()) else {
            return self.clone();
        };
        let keep = rng.bernoulli(&shape, 1.0 - rate, dtype);
        self * &keep * (1.0 / (1.0 - rate))
    }
}
