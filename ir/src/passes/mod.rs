//! The optimization pipeline. `PIPELINE` below is the one ordered list of passes, read top to bottom;
//! there are no priorities. Rewrite rules are named, carry their algebra in a comment, and live by
//! theme (`algebraic`, `stabilize`); a rule's replacement must have the node's exact type, otherwise
//! it is not applied, so a rule never changes what a graph computes or its shape. Every fixpoint is
//! bounded (sweeps, graph growth and time). In debug and test builds the graph is verified after every
//! pass. The `RewriteLog` counts which rules fired, so "why is this node here?" has an answer.

pub mod algebraic;
pub mod cprop;
pub mod dce;
pub mod fusion;
pub mod merge;
pub mod stabilize;

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use std::collections::BTreeMap;

/// Which rules and passes fired, and how often (ordered by name, so printing is stable).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewriteLog {
    pub counts: BTreeMap<String, usize>,
}

impl RewriteLog {
    pub fn record(&mut self, rule: &str) {
        *self.counts.entry(rule.to_string()).or_default() += 1;
    }
    pub fn count(&self, rule: &str) -> usize {
        self.counts.get(rule).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for RewriteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (k, v) in &self.counts {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut Graph, &mut RewriteLog) -> Result<bool>,
}

/// The main pipeline, in order. Stabilization runs before constant folding, so `log(1 + exp(800))`
/// folds to 800 and not to inf.
pub const PIPELINE: &[Pass] = &[
    Pass { name: "canonicalize", run: algebraic::run },
    Pass { name: "stabilize", run: stabilize::run },
    Pass { name: "constant_fold", run: cprop::run },
    Pass { name: "merge", run: merge::run },
    Pass { name: "dead_code", run: dce::run },
    Pass { name: "fuse_elementwise", run: fusion::run },
];

/// Options of `optimize`.
#[derive(Clone, Copy, Debug)]
pub struct OptimizeOptions {
    /// Run the passes at all (off: only dead-code elimination, for comparing against the original).
    pub rewrite: bool,
    /// Group elementwise regions into fused kernels.
    pub fuse: bool,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        OptimizeOptions { rewrite: true, fuse: true }
    }
}

/// Runs the pipeline on a graph whose outputs are set.
pub fn optimize(g: &mut Graph, opts: OptimizeOptions) -> Result<RewriteLog> {
    let mut log = RewriteLog::default();
    for pass in PIPELINE {
        let skip = (!opts.rewrite && pass.name != "dead_code") || (!opts.fuse && pass.name == "fuse_elementwise");
        if skip {
            continue;
        }
        (pass.run)(g, &mut log)?;
        if cfg!(debug_assertions) {
            g.verify().map_err(|e| crate::Error::Invalid(format!("after pass '{}': {e}", pass.name)))?;
        }
    }
    Ok(log)
}

/// A named local rewrite: given a node, return a replacement node (built in the graph) or `None`.
pub struct Rule {
    pub name: &'static str,
    pub apply: fn(&mut Graph, NodeId) -> Result<Option<NodeId>>,
}

/// At most this many sweeps over the graph per rule set.
const MAX_SWEEPS: usize = 16;
/// No new sweep starts after this long, so compile time stays predictable on huge graphs.
const MAX_SWEEP_TIME: std::time::Duration = std::time::Duration::from_secs(2);
/// Stop rewriting once the graph has grown this many times over.
const MAX_GROWTH: usize = 4;

/// Applies `rules` to every node until nothing fires (bounded). The first rule that fires on a node
/// wins; its replacement must have exactly the node's type.
pub fn rewrite_to_fixpoint(g: &mut Graph, rules: &[Rule], log: &mut RewriteLog) -> Result<bool> {
    let limit = g.len().max(16) * MAX_GROWTH;
    let mut changed_any = false;
    let start = std::time::Instant::now();
    for _ in 0..MAX_SWEEPS {
        dce::remove_dead(g);
        let mut changed = false;
        for n in g.topo_order(g.outputs()) {
            if !g.contains(n) || g.use_count(n) == 0 {
                continue;
            }
            for rule in rules {
                if let Some(r) = (rule.apply)(g, n)? {
                    if r != n && g.ty(r) == g.ty(n) {
                        g.replace_all_uses(n, r);
                        log.record(rule.name);
                        changed = true;
                        break;
                    }
                }
            }
        }
        changed_any |= changed;
        if !changed || g.len() > limit || start.elapsed() > MAX_SWEEP_TIME {
            break;
        }
    }
    dce::remove_dead(g);
    Ok(changed_any)
}

/// Pattern helpers shared by the rule files.
pub mod pat {
    use crate::graph::{Graph, NodeId};
    use crate::ops::{BinaryOp, Op, UnaryOp};

    /// The value of a constant whose elements are all equal.
    pub fn const_value(g: &Graph, n: NodeId) -> Option<f64> {
        let t = g.op(n).as_constant()?;
        let v = t.to_f64_vec();
        let first = *v.first()?;
        v.iter().all(|&x| x == first || (x.is_nan() && first.is_nan())).then_some(first)
    }
    pub fn is_const(g: &Graph, n: NodeId, value: f64) -> bool {
        const_value(g, n) == Some(value)
    }
    /// `op(x)` -> x
    pub fn unary(g: &Graph, n: NodeId, op: UnaryOp) -> Option<NodeId> {
        (*g.op(n) == Op::Unary(op)).then(|| g.inputs(n)[0])
    }
    /// `a op b` -> (a, b)
    pub fn binary(g: &Graph, n: NodeId, op: BinaryOp) -> Option<(NodeId, NodeId)> {
        (*g.op(n) == Op::Binary(op)).then(|| (g.inputs(n)[0], g.inputs(n)[1]))
    }
}
