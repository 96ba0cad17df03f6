//! Keras-style progress: `Epoch 3/10`, then a bar `312/469 [=====>....] - loss: 0.4213 -
//! accuracy: 0.8456` that fills as batches run (indicatif), ending with the epoch's time, time per
//! step and validation scores. When standard output is not a terminal (CI, a pipe), only the final
//! line of each epoch is printed, as plain text.

use super::history::EpochLog;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    steps: usize,
    verbose: u8,
}

fn scores(values: &[(String, f64)]) -> String {
    values.iter().map(|(n, v)| format!(" - {n}: {v:.4}")).collect()
}

impl Progress {
    pub(crate) fn new(epoch: usize, epochs: usize, steps: usize, verbose: u8) -> Progress {
        let interactive = verbose == 1 && std::io::stdout().is_terminal();
        if verbose > 0 {
            println!("Epoch {}/{epochs}", epoch + 1);
        }
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template("{pos}/{len} [{bar:30}] {msg}")
                .expect("valid template")
                .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress { bar, steps, verbose }
    }

    /// Whether a bar is being drawn (only then are running means worth computing).
    pub(crate) fn is_live(&self) -> bool {
        self.bar.is_some()
    }

    /// After batch `done` (1-based), with the running means.
    pub(crate) fn update(&mut self, done: usize, values: &[(String, f64)]) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(scores(values)[3..].to_string());
        }
    }

    pub(crate) fn finish(&mut self, log: &EpochLog) {
        if self.verbose == 0 {
            return;
        }
        let line = epoch_summary(log, self.steps);
        match self.bar.take() {
            Some(bar) => {
                bar.set_message(line);
                bar.finish();
            }
            None => println!("{n}/{n} [{}] - {line}", "=".repeat(30), n = self.steps),
        }
    }
}

/// `2.1s 4ms/step - loss: 0.4213 - accuracy: 0.8456 - val_loss: ... - val_accuracy: ...`
fn epoch_summary(log: &EpochLog, steps: usize) -> String {
    let mut values = vec![("loss".to_string(), log.loss)];
    values.extend(log.metrics.iter().cloned());
    if let Some(v) = &log.val {
        values.push(("val_loss".into(), v.loss));
        values.extend(v.metrics.iter().map(|(n, x)| (format!("val_{n}"), *x)));
    }
    let per_step = log.seconds / steps.max(1) as f64;
    let step = if per_step >= 1e-3 {
        format!("{:.0}ms/step", per_step * 1e3)
    } else {
        format!("{:.0}us/step", per_step * 1e6)
    };
    format!("{:.1}s {step}{}", log.seconds, scores(&values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Scores;

    #[test]
    fn epoch_lines_read_like_keras() {
        let log = EpochLog {
            loss: 0.42131,
            metrics: vec![("accuracy".into(), 0.84562)],
            val: Some(Scores { loss: 0.5, metrics: vec![("accuracy".into(), 0.8)] }),
            seconds: 1.876,
        };
        assert_eq!(
            epoch_summary(&log, 469),
            "1.9s 4ms/step - loss: 0.4213 - accuracy: 0.8456 - val_loss: 0.5000 - val_accuracy: 0.8000"
        );
    }
}
