//! Optimizers with Keras's update rules. Their state (velocities, moment estimates, accumulators,
//! the iteration count) lives in shared variables, so a training step's updates are part of the
//! one compiled function. With `g` the gradient of parameter `p` and `t` the number of steps
//! taken before this one:
//!
//! - SGD: `lr_t = lr / (1 + decay t)`; without momentum `p -= lr_t g`; with momentum `v = m v - lr_t g`
//!   then `p += v`, or with Nesterov `p += m v - lr_t g`.
//! - Adam: `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//!   `p -= lr sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m / (sqrt(v) + eps)`.
//! - RMSprop: `a = rho a + (1 - rho) g^2`, `p -= lr g / (sqrt(a) + eps)`.
//! - Adagrad: `a += g^2` (from 0.1), `p -= lr g / (sqrt(a) + eps)`.

use crate::prelude::*;
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    Sgd { learning_rate: f64, momentum: f64, nesterov: bool, decay: f64 },
    Adam { learning_rate: f64, beta_1: f64, beta_2: f64, epsilon: f64 },
    RmsProp { learning_rate: f64, rho: f64, epsilon: f64 },
    Adagrad { learning_rate: f64, initial_accumulator: f64, epsilon: f64 },
}

impl Optimizer {
    /// Plain SGD (Keras's defaults: no momentum, no decay).
    pub fn sgd(learning_rate: f64) -> Optimizer {
        Optimizer::Sgd { learning_rate, momentum: 0.0, nesterov: false, decay: 0.0 }
    }
    pub fn sgd_momentum(learning_rate: f64, momentum: f64, nesterov: bool) -> Optimizer {
        Optimizer::Sgd { learning_rate, momentum, nesterov, decay: 0.0 }
    }
    /// Keras's defaults: beta_1 0.9, beta_2 0.999, epsilon 1e-7.
    pub fn adam(learning_rate: f64) -> Optimizer {
        Optimizer::Adam { learning_rate, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7 }
    }
    /// Keras's defaults: rho 0.9, epsilon 1e-7.
    pub fn rmsprop(learning_rate: f64) -> Optimizer {
        Optimizer::RmsProp { learning_rate, rho: 0.9, epsilon: 1e-7 }
    }
    /// Keras's defaults: initial accumulator 0.1, epsilon 1e-7.
    pub fn adagrad(learning_rate: f64) -> Optimizer {
        Optimizer::Adagrad { learning_rate, initial_accumulator: 0.1, epsilon: 1e-7 }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "SGD",
            Optimizer::Adam { .. } => "Adam",
            Optimizer::RmsProp { .. } => "RMSprop",
            Optimizer::Adagrad { .. } => "Adagrad",
        }
    }

    /// The new values of `params` (and of the optimizer's state, created here as shared
    /// variables named after each parameter) for one step with gradients `grads`.
    pub fn updates(&self, g: &Graph, params: &[Var], grads: &[Var]) -> Result<Vec<(Var, Var)>> {
        let iterations = g.shared("optimizer.iterations", Tensor::scalar(F32, 0.0));
        let mut updates = vec![(iterations.clone(), &iterations + 1.0)];
        let slot = |p: &Var, what: &str, init: f64| -> Result<Var> {
            let shape = p.value()?.shape().to_vec();
            let name = format!("{}.{what}", p.name().unwrap_or_else(|| "param".into()));
            Ok(g.shared(&name, Tensor::from_f64(F32, &shape, &vec![init; shape.iter().product()])))
        };
        for (p, gp) in params.iter().zip(grads) {
            match *self {
                Optimizer::Sgd { learning_rate, momentum, nesterov, decay } => {
                    let lr = if decay > 0.0 {
                        learning_rate * (&iterations * decay + 1.0).reciprocal()
                    } else {
                        g.scalar(F32, learning_rate)
                    };
                    if momentum > 0.0 {
                        let v = slot(p, "velocity", 0.0)?;
                        let v_new = &v * momentum - &lr * gp;
                        let p_new = if nesterov { p + &v_new * momentum - &lr * gp } else { p + &v_new };
                        updates.push((p.clone(), p_new));
                        updates.push((v, v_new));
                    } else {
                        updates.push((p.clone(), p - &lr * gp));
                    }
                }
                Optimizer::Adam { learning_rate, beta_1, beta_2, epsilon } => {
                    let (m, v) = (slot(p, "m", 0.0)?, slot(p, "v", 0.0)?);
                    let t = &iterations + 1.0;
                    let (b1_t, b2_t): (Var, Var) = (g.scalar(F32, beta_1).pow(&t), g.scalar(F32, beta_2).pow(&t));
                    let correction = (1.0f64 - b2_t).sqrt() / (1.0f64 - b1_t);
                    let m_new = &m * beta_1 + (1.0 - beta_1) * gp;
                    let v_new = &v * beta_2 + (1.0 - beta_2) * (gp * gp);
                    let step = learning_rate * correction * &m_new / (v_new.sqrt() + epsilon);
                    updates.push((p.clone(), p - step));
                    updates.push((m, m_new));
                    updates.push((v, v_new));
                }
                Optimizer::RmsProp { learning_rate, rho, epsilon } => {
                    let a = slot(p, "rms", 0.0)?;
                    let a_new = &a * rho + (1.0 - rho) * (gp * gp);
                    updates.push((p.clone(), p - learning_rate * gp / (a_new.sqrt() + epsilon)));
                    updates.push((a, a_new));
                }
                Optimizer::Adagrad { learning_rate, initial_accumulator, epsilon } => {
                    let a = slot(p, "accumulator", initial_accumulator)?;
                    let a_new = &a + gp * gp;
                    updates.push((p.clone(), p - learning_rate * gp / (a_new.sqrt() + epsilon)));
                    updates.push((a, a_new));
                }
            }
        }
        Ok(updates)
    }
}
