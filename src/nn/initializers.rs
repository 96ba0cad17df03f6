//! Weight initializers with Keras's definitions: `fan_in` and `fan_out` are a kernel's input and
//! output sizes. The Glorot and He normal initializers draw from a normal truncated at two standard
//! deviations, scaled (by 1/0.8796) so the truncated draws keep the intended standard deviation, as
//! Keras does. Every draw comes from the seeded generator the model passes in.

use ndarray::ArrayD;
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Initializer {
    Zeros,
    Ones,
    Constant(f64),
    Uniform {
        low: f64,
        high: f64,
    },
    Normal {
        mean: f64,
        std: f64,
    },
    /// U(-l, l) with l = sqrt(6 / (fan_in + fan_out)) (Xavier).
    GlorotUniform,
    /// Truncated N(0, 2 / (fan_in + fan_out)).
    GlorotNormal,
    /// U(-l, l) with l = sqrt(6 / fan_in).
    HeUniform,
    /// Truncated N(0, 2 / fan_in).
    HeNormal,
}

/// The standard deviation of a unit normal truncated at +-2, which Keras divides by.
const TRUNCATED_STD: f64 = 0.879_625_661_034_239_8;

impl Initializer {
    /// Keras's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            Initializer::Zeros => "zeros",
            Initializer::Ones => "ones",
            Initializer::Constant(_) => "constant",
            Initializer::Uniform { .. } => "random_uniform",
            Initializer::Normal { .. } => "random_normal",
            Initializer::GlorotUniform => "glorot_uniform",
            Initializer::GlorotNormal => "glorot_normal",
            Initializer::HeUniform => "he_uniform",
            Initializer::HeNormal => "he_normal",
        }
    }

    /// Values of `shape` (f32) for a kernel with these fans.
    pub fn sample(&self, shape: &[usize], fan_in: usize, fan_out: usize, rng: &mut impl Rng) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let (fi, fo) = (fan_in.max(1) as f64, fan_out.max(1) as f64);
        let uniform = |l: f64, h: f64, rng: &mut dyn rand::RngCore| -> Vec<f32> {
            let u = Uniform::new(l, h).expect("low < high");
            (0..n).map(|_| u.sample(rng) as f32).collect()
        };
        let truncated = |std: f64, rng: &mut dyn rand::RngCore| -> Vec<f32> {
            let z = Normal::new(0.0, 1.0).expect("unit normal");
            (0..n)
                .map(|_| loop {
                    let v: f64 = z.sample(rng);
                    if v.abs() <= 2.0 {
                        break (v * std / TRUNCATED_STD) as f32;
                    }
                })
                .collect()
        };
        let values = match *self {
            Initializer::Zeros => vec![0.0; n],
            Initializer::Ones => vec![1.0; n],
            Initializer::Constant(c) => vec![c as f32; n],
            Initializer::Uniform { low, high } => uniform(low, high, rng),
            Initializer::Normal { mean, std } => {
                let d = Normal::new(mean, std).expect("std >= 0");
                (0..n).map(|_| d.sample(rng) as f32).collect()
            }
            Initializer::GlorotUniform => {
                let l = (6.0 / (fi + fo)).sqrt();
                uniform(-l, l, rng)
            }
            Initializer::GlorotNormal => truncated((2.0 / (fi + fo)).sqrt(), rng),
            Initializer::HeUniform => {
                let l = (6.0 / fi).sqrt();
                uniform(-l, l, rng)
            }
            Initializer::HeNormal => truncated((2.0 / fi).sqrt(), rng),
        };
        ArrayD::from_shape_vec(shape.to_vec(), values).expect("n elements")
    }
}
