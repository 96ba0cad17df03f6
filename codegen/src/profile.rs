//! Per-step timing tables for the native backends' profiles (`KILN_CPU_PROFILE=1`,
//! `KILN_CUDA_PROFILE=1`): total time and count per step name, in the order steps first ran,
//! printed as a table sorted by time when the function is dropped, and read as a `Profile`.

use std::collections::HashMap;

#[derive(Default)]
pub(crate) struct StepProfile {
    totals: HashMap<String, (f64, usize)>,
    order: Vec<String>,
}

impl StepProfile {
    /// Whether the environment variable `var` asks for a profile.
    pub(crate) fn requested(var: &str) -> Option<StepProfile> {
        std::env::var(var).is_ok_and(|v| v == "1").then(StepProfile::default)
    }

    pub(crate) fn add(&mut self, name: &str, seconds: f64) {
        if !self.totals.contains_key(name) {
            self.order.push(name.to_string());
            self.totals.insert(name.to_string(), (0.0, 0));
        }
        let entry = self.totals.get_mut(name).expect("inserted above");
        entry.0 += seconds;
        entry.1 += 1;
    }

    /// The profile so far, by a backend named `backend`.
    pub(crate) fn profile(&self, backend: &'static str) -> Profile {
        let all: f64 = self.totals.values().map(|t| t.0).sum();
        let calls = self.totals.values().map(|t| t.1).max().unwrap_or(1);
        let mut steps: Vec<ProfiledStep> = self
            .order
            .iter()
            .map(|name| {
                let (seconds, runs) = self.totals[name];
                ProfiledStep {
                    name: name.clone(),
                    seconds_per_run: seconds / runs as f64,
                    share: seconds / all.max(1e-12),
                }
            })
            .collect();
        steps.sort_by(|a, b| (b.share).total_cmp(&a.share));
        Profile { backend, seconds_per_call: all / calls as f64, steps }
    }
}

/// A compiled function's time per step over its calls so far (`Function::profile`), where the
/// backend was asked for one (`KILN_CPU_PROFILE=1`, `KILN_CUDA_PROFILE=1`). Printed, the table
/// that the backend prints when the function is dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub backend: &'static str,
    /// Seconds per call, every step together.
    pub seconds_per_call: f64,
    /// Every step that ran, the most time first.
    pub steps: Vec<ProfiledStep>,
}

/// One step of a `Profile`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfiledStep {
    /// The kernel's or product's name, as in the generated code.
    pub name: String,
    pub seconds_per_run: f64,
    /// Its share of all the steps' time (0 to 1).
    pub share: f64,
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_call = self.seconds_per_call * 1e6;
        writeln!(f, "kiln {} profile: {per_call:.1} us per call in {} steps", self.backend, self.steps.len())?;
        for s in &self.steps {
            writeln!(f, "{:>9.1} us {:>5.1}%  {}", s.seconds_per_run * 1e6, 100.0 * s.share, s.name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_gives_each_step_its_time_per_run_and_share_most_first() {
        let mut p = StepProfile::default();
        for _ in 0..2 {
            p.add("k1_fused", 1e-6);
            p.add("k2_matmul", 3e-6);
        }
        let profile = p.profile("CPU");
        assert_eq!(profile.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["k2_matmul", "k1_fused"]);
        assert!((profile.seconds_per_call - 4e-6).abs() < 1e-12);
        assert!(
            (profile.steps[0].seconds_per_run - 3e-6).abs() < 1e-12 && (profile.steps[0].share - 0.75).abs() < 1e-9
        );
        let table = profile.to_string();
        assert!(table.starts_with("kiln CPU profile: 4.0 us per call in 2 steps\n"), "{table}");
        assert!(table.contains("      3.0 us  75.0%  k2_matmul\n"), "{table}");
    }
}
