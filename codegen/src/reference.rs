//! The reference backend: an interpreter over ndarray that runs any graph, optimized (fused kernels
//! included) or not, in every dtype, by calling each op's reference semantics from kiln-ir. It is
//! slow on purpose-simple code: it is the oracle. Values are dropped after their last reader, so a
//! long training graph does not hold every intermediate at once.

use crate::{Backend, CompileOptions, Executable, Program, SharedValue};
use kiln_ir::specialize::specialize_with;
use kiln_ir::{Error, Graph, NodeId, Result, Tensor};
use std::collections::HashMap;

pub struct Reference;

impl Backend for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }
    fn compile(&self, program: &Program, _opts: &CompileOptions) -> Result<Box<dyn Executable>> {
        Ok(Box::new(Interpreter { program: program.clone(), cache: HashMap::new() }))
    }
}

/// One shape specialization: the concrete graph, its evaluation order, and when each value dies.
struct Plan {
    graph: Graph,
    order: Vec<NodeId>,
    last_use: HashMap<NodeId, usize>,
}

struct Interpreter {
    program: Program,
    cache: HashMap<Vec<Vec<usize>>, Plan>,
}

impl Interpreter {
    fn plan(&mut self, key: Vec<Vec<usize>>) -> Result<&Plan> {
        if !self.cache.contains_key(&key) {
            let sources = self.program.inputs.iter().chain(&self.program.shared);
            let shapes = sources.zip(&key).map(|(&n, s)| (n, s.clone())).collect();
            let (graph, _) = specialize_with(&self.program.graph, &shapes, &self.program.known)?;
            let order = graph.topo_order(graph.outputs());
            let mut last_use = HashMap::new();
            for (step, &n) in order.iter().enumerate() {
                for &i in graph.inputs(n) {
                    last_use.insert(i, step);
                }
            }
            for &o in graph.outputs() {
                last_use.insert(o, usize::MAX);
            }
            self.cache.insert(key.clone(), Plan { graph, order, last_use });
        }
        Ok(&self.cache[&key])
    }
}

impl Interpreter {
    /// Every output of the program, from the given source values.
    fn evaluate(&mut self, inputs: &[&Tensor], shared: &[&Tensor]) -> Result<Vec<Tensor>> {
        let key: Vec<Vec<usize>> = inputs.iter().chain(shared).map(|t| t.shape().to_vec()).collect();
        let bound: HashMap<NodeId, &Tensor> = self
            .program
            .inputs
            .iter()
            .chain(&self.program.shared)
            .copied()
            .zip(inputs.iter().chain(shared).copied())
            .collect();
        let plan = self.plan(key)?;
        let mut values: HashMap<NodeId, Tensor> = HashMap::new();
        for (step, &n) in plan.order.iter().enumerate() {
            let node = plan.graph.node(n);
            let v = match bound.get(&n) {
                Some(t) => (*t).clone(),
                None => {
                    let args: Vec<&Tensor> = node.inputs.iter().map(|i| &values[i]).collect();
                    node.op.eval(&args, &node.ty).map_err(|detail| Error::Runtime {
                        op: node.op.label(),
                        detail,
                        at: node.at,
                    })?
                }
            };
            values.insert(n, v);
            for &i in &node.inputs {
                if plan.last_use.get(&i) == Some(&step) {
                    values.remove(&i);
                }
            }
        }
        Ok(plan.graph.outputs().iter().map(|o| values[o].clone()).collect())
    }
}

impl Executable for Interpreter {
    fn run(&mut self, inputs: &[&Tensor], shared: &mut [SharedValue]) -> Result<Vec<Tensor>> {
        crate::with_host_values(shared, |shared| {
            let outputs = {
                let shared_refs: Vec<&Tensor> = shared.iter().collect();
                self.evaluate(inputs, &shared_refs)?
            };
            crate::apply_updates(&self.program, outputs, shared)
        })
    }

    fn prepare(&mut self, shapes: &[Vec<usize>]) -> Result<()> {
        self.plan(shapes.to_vec()).map(|_| ())
    }

    fn generated_code(&self) -> String {
        String::new()
    }
}
