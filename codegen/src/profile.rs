//! Per-step timing tables for the native backends' profiles (`KILN_CPU_PROFILE=1`,
//! `KILN_CUDA_PROFILE=1`): total time and count per step name, in the order steps first ran,
//! printed as a table sorted by time when the function is dropped.

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

    /// The table, headed `kiln {backend} profile`.
    pub(crate) fn report(&self, backend: &str) -> String {
        let all: f64 = self.totals.values().map(|t| t.0).sum();
        let calls = self.totals.values().map(|t| t.1).max().unwrap_or(1);
        let mut rows: Vec<(&String, &(f64, usize))> = self.order.iter().map(|n| (n, &self.totals[n])).collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let per_call = all * 1e6 / calls as f64;
        let mut s = format!("kiln {backend} profile: {per_call:.1} us per call in {} steps\n", rows.len());
        for (name, (secs, n)) in rows {
            let share = 100.0 * secs / all.max(1e-12);
            s.push_str(&format!("{:>9.1} us {share:>5.1}%  {name}\n", secs * 1e6 / *n as f64));
        }
        s
    }
}
