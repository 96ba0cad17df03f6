//! The graph: nodes (op, type, ordered inputs, optional name, user call site) in a petgraph
//! `StableGraph`, whose indices survive rewrites, plus the graph's outputs. Edges run from an input to
//! its user and carry the operand slot, so users are found without a scan. This module keeps the two
//! views (each node's ordered inputs, the edges) in step; `verify` checks that they are.

use crate::error::{Error, Loc, Result};
use crate::ops::Op;
use crate::types::TensorType;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::HashMap;

pub type NodeId = NodeIndex<u32>;

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    pub inputs: Vec<NodeId>,
    pub name: Option<String>,
    pub at: Loc,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    nodes: StableDiGraph<Node, u32>,
    outputs: Vec<NodeId>,
    next_stream: u32,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds a node after checking its operands against the op's type rule. On a mismatch the error
    /// names the op, the operand types and the user's call site.
    pub fn add(&mut self, op: Op, inputs: &[NodeId], at: Loc) -> Result<NodeId> {
        for &i in inputs {
            if !self.nodes.contains_node(i) {
                return Err(Error::Invalid(format!("{}: operand {i:?} is not a node of this graph", op.label())));
            }
        }
        let tys: Vec<&TensorType> = inputs.iter().map(|&i| &self.nodes[i].ty).collect();
        let ty = op.infer(&tys).map_err(|detail| {
            let operands: Vec<String> = tys.iter().map(|t| t.to_string()).collect();
            let detail =
                if operands.is_empty() { detail } else { format!("{detail} (operands: {})", operands.join(", ")) };
            Error::Type { op: op.label(), detail, at }
        })?;
        Ok(self.add_typed(op, ty, inputs, at))
    }

    /// Adds a node whose type is already known (used when copying checked nodes).
    pub(crate) fn add_typed(&mut self, op: Op, ty: TensorType, inputs: &[NodeId], at: Loc) -> NodeId {
        let id = self.nodes.add_node(Node { op, ty, inputs: inputs.to_vec(), name: None, at });
        for (slot, &i) in inputs.iter().enumerate() {
            self.nodes.add_edge(i, id, slot as u32);
        }
        id
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }
    pub fn contains(&self, id: NodeId) -> bool {
        self.nodes.contains_node(id)
    }
    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.nodes[id].ty
    }
    pub fn op(&self, id: NodeId) -> &Op {
        &self.nodes[id].op
    }
    pub fn inputs(&self, id: NodeId) -> &[NodeId] {
        &self.nodes[id].inputs
    }
    pub fn set_name(&mut self, id: NodeId, name: &str) {
        self.nodes[id].name = Some(name.to_string());
    }
    pub fn len(&self) -> usize {
        self.nodes.node_count()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.node_count() == 0
    }
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.node_indices().collect()
    }
    pub fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }
    pub fn set_outputs(&mut self, outputs: Vec<NodeId>) {
        self.outputs = outputs;
    }
    /// A fresh id for a random node's stream, so that two random ops never draw the same numbers.
    pub fn new_stream(&mut self) -> u32 {
        self.next_stream += 1;
        self.next_stream
    }

    /// The distinct users of a node, in index order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self.nodes.edges_directed(id, Direction::Outgoing).map(|e| e.target()).collect();
        u.sort();
        u.dedup();
        u
    }
    /// How many operand slots (and graph outputs) read this node.
    pub fn use_count(&self, id: NodeId) -> usize {
        self.nodes.edges_directed(id, Direction::Outgoing).count() + self.outputs.iter().filter(|&&o| o == id).count()
    }

    /// Makes every user of `old` (and every graph output that is `old`) read `new` instead, except
    /// `new` itself (so a node can be wrapped: replace x by f(x)).
    pub fn replace_all_uses(&mut self, old: NodeId, new: NodeId) {
        if old == new {
            return;
        }
        let edges: Vec<_> = self
            .nodes
            .edges_directed(old, Direction::Outgoing)
            .filter(|e| e.target() != new)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (eid, user, slot) in edges {
            self.nodes.remove_edge(eid);
            self.nodes[user].inputs[slot as usize] = new;
            self.nodes.add_edge(new, user, slot);
        }
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes a node; its users must already have been redirected.
    pub fn remove(&mut self, id: NodeId) {
        self.nodes.remove_node(id);
    }

    /// Nodes reachable from `roots`, inputs before users, in a deterministic order (depth first,
    /// operands left to right).
    pub fn topo_order(&self, roots: &[NodeId]) -> Vec<NodeId> {
        let mut order = Vec::new();
        let mut state: HashMap<NodeId, bool> = HashMap::new(); // false: open, true: done
        for &r in roots {
            if state.contains_key(&r) {
                continue;
            }
            let mut stack = vec![(r, 0usize)];
            state.insert(r, false);
            while let Some((n, next)) = stack.pop() {
                let ins = &self.nodes[n].inputs;
                if next < ins.len() {
                    stack.push((n, next + 1));
                    let i = ins[next];
                    if let std::collections::hash_map::Entry::Vacant(e) = state.entry(i) {
                        e.insert(false);
                        stack.push((i, 0));
                    }
                } else {
                    state.insert(n, true);
                    order.push(n);
                }
            }
        }
        order
    }

    /// Every node, inputs before users (roots: the outputs, then any node nobody reads).
    pub fn topo_all(&self) -> Vec<NodeId> {
        let mut roots = self.outputs.clone();
        roots.extend(self.nodes.node_indices().filter(|&n| self.users(n).is_empty()));
        self.topo_order(&roots)
    }

    /// Copies the nodes that `roots` depend on into a new graph, reading `substitute[n]` wherever a
    /// node `n` is read (Theano's givens). Returns the new graph and the map old -> new, or the type
    /// error of a node that does not accept its substituted operands.
    pub fn extract(
        &self,
        roots: &[NodeId],
        substitute: &HashMap<NodeId, NodeId>,
    ) -> Result<(Graph, HashMap<NodeId, NodeId>)> {
        // A substitute may itself read substituted nodes, so resolve at every read.
        let resolve = |n: NodeId| *substitute.get(&n).unwrap_or(&n);
        let mut out = Graph { next_stream: self.next_stream, ..Graph::default() };
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        let sub_roots: Vec<NodeId> = roots.iter().map(|&r| resolve(r)).collect();
        for n in self.topo_order_with(&sub_roots, &resolve) {
            let node = &self.nodes[n];
            let ins: Vec<NodeId> = node.inputs.iter().map(|&i| map[&resolve(i)]).collect();
            // Types are inferred again: a substitute may have a more specific shape.
            let id = out.add(node.op.clone(), &ins, node.at)?;
            out.nodes[id].name = node.name.clone();
            map.insert(n, id);
        }
        for (k, v) in substitute {
            if let Some(&m) = map.get(v) {
                map.insert(*k, m);
            }
        }
        Ok((out, map))
    }

    fn topo_order_with(&self, roots: &[NodeId], resolve: &dyn Fn(NodeId) -> NodeId) -> Vec<NodeId> {
        let mut order = Vec::new();
        let mut done: std::collections::HashSet<NodeId> = std::collections::HashSet::new();
        let mut open: std::collections::HashSet<NodeId> = std::collections::HashSet::new();
        for &r in roots {
            let mut stack = vec![(r, 0usize)];
            if done.contains(&r) || !open.insert(r) {
                continue;
            }
            while let Some((n, next)) = stack.pop() {
                let ins = &self.nodes[n].inputs;
                if next < ins.len() {
                    stack.push((n, next + 1));
                    let i = resolve(ins[next]);
                    if !done.contains(&i) && open.insert(i) {
                        stack.push((i, 0));
                    }
                } else {
                    done.insert(n);
                    order.push(n);
                }
            }
        }
        order
    }

    /// Checks the graph's invariants: operand lists and edges agree, every node's type is what its op
    /// infers from its operands, and the graph is acyclic. Run after every pass in debug builds.
    pub fn verify(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("graph verification failed: {m}")));
        for n in self.nodes.node_indices() {
            let node = &self.nodes[n];
            let mut from_edges: Vec<(u32, NodeId)> =
                self.nodes.edges_directed(n, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
            from_edges.sort();
            let listed: Vec<(u32, NodeId)> = node.inputs.iter().enumerate().map(|(s, &i)| (s as u32, i)).collect();
            if from_edges != listed {
                return bad(format!("node {n:?} ({}) operands {listed:?} but edges {from_edges:?}", node.op.label()));
            }
            let tys: Vec<&TensorType> = node.inputs.iter().map(|&i| &self.nodes[i].ty).collect();
            match node.op.infer(&tys) {
                Ok(t) if t == node.ty => {}
                Ok(t) => return bad(format!("node {n:?} ({}) has type {} but infers {t}", node.op.label(), node.ty)),
                Err(e) => return bad(format!("node {n:?} ({}): {e}", node.op.label())),
            }
        }
        for &o in &self.outputs {
            if !self.nodes.contains_node(o) {
                return bad(format!("output {o:?} is not a node"));
            }
        }
        if petgraph::algo::is_cyclic_directed(&self.nodes) {
            return bad("the graph has a cycle".into());
        }
        Ok(())
    }
}

impl Graph {
    /// Replaces a node's op and type in place (for specialization, which keeps the structure).
    pub(crate) fn set_node(&mut self, id: NodeId, op: Op, ty: TensorType) {
        let n = &mut self.nodes[id];
        n.op = op;
        n.ty = ty;
    }
}
