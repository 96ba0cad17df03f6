//! Printing graphs for people. `debugprint` is a tree in Theano's spirit: one line per node with its
//! op, a stable id (`[id A]`, assigned in the order the walk meets nodes, so equal graphs print the
//! same), its type, and its name; a node already printed is shown again only by its id. `to_dot` is
//! GraphViz with the same ids.

use crate::error::At;
use crate::graph::{Graph, NodeId};
use crate::ops::{Op, SourceOp};
use std::collections::HashMap;
use std::fmt::Write;

#[derive(Clone, Copy, Debug, Default)]
pub struct PrintOptions {
    /// Append each node's user call site (`@ file:line:col`).
    pub locations: bool,
}

/// `A`, `B`, ..., `Z`, `BA`, ... (Theano's ids).
fn id_name(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'A' + (i % 26) as u8);
        i /= 26;
        if i == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

fn describe(g: &Graph, n: NodeId) -> String {
    let node = g.node(n);
    let kind = match &node.op {
        Op::Source(SourceOp::Input { .. }) => " (input)",
        Op::Source(SourceOp::Shared { .. }) => " (shared)",
        _ => "",
    };
    let name = match (&node.name, &node.op) {
        (Some(name), op) if !matches!(op, Op::Source(SourceOp::Input { .. } | SourceOp::Shared { .. })) => {
            format!(" '{name}'")
        }
        _ => String::new(),
    };
    format!("{}{kind}", format_args!("{}", node.op.label())) + &format!(" <{}>{name}", node.ty)
}

/// The tree of `roots` (a graph's outputs by default).
pub fn debugprint(g: &Graph, roots: &[NodeId], opts: PrintOptions) -> String {
    let mut ids: HashMap<NodeId, String> = HashMap::new();
    let mut out = String::new();
    for &r in roots {
        walk(g, r, "", "", &mut ids, &mut out, opts);
    }
    out
}

fn walk(
    g: &Graph,
    n: NodeId,
    first: &str,
    rest: &str,
    ids: &mut HashMap<NodeId, String>,
    out: &mut String,
    opts: PrintOptions,
) {
    if let Some(id) = ids.get(&n) {
        let label = g.node(n).op.label();
        let _ = writeln!(out, "{first}{label} [id {id}]");
        return;
    }
    let id = id_name(ids.len());
    ids.insert(n, id.clone());
    let (head, tail) = describe(g, n).split_once(" <").map(|(a, b)| (a.to_string(), b.to_string())).expect("type");
    let _ = write!(out, "{first}{head} [id {id}] <{tail}");
    if opts.locations {
        let _ = write!(out, " @ {}", At(g.node(n).at));
    }
    out.push('\n');
    for &i in g.inputs(n) {
        walk(g, i, &format!("{rest} |"), &format!("{rest} |"), ids, out, opts);
    }
}

/// GraphViz DOT of the nodes `roots` read, operands pointing at their users.
pub fn to_dot(g: &Graph, roots: &[NodeId]) -> String {
    let order = g.topo_order(roots);
    let ids: HashMap<NodeId, String> = order.iter().enumerate().map(|(i, &n)| (n, id_name(i))).collect();
    let mut s = String::from("digraph kiln {\n  rankdir=BT;\n  node [fontname=\"monospace\"];\n");
    for &n in &order {
        let node = g.node(n);
        let shape = match node.op {
            Op::Source(SourceOp::Input { .. }) => "box, style=filled, fillcolor=lightblue",
            Op::Source(SourceOp::Shared { .. }) => "box, style=filled, fillcolor=lightgreen",
            Op::Source(SourceOp::Constant(_)) => "box, style=dashed",
            Op::Fused(_) => "box, style=filled, fillcolor=lightyellow",
            _ => "ellipse",
        };
        let label = format!("{} [id {}]\\n{}", node.op.label(), ids[&n], node.ty).replace('"', "\\\"");
        let _ = writeln!(s, "  {} [label=\"{label}\", shape={shape}];", ids[&n]);
    }
    for &n in &order {
        for (slot, i) in g.inputs(n).iter().enumerate() {
            let _ = writeln!(s, "  {} -> {} [label=\"{slot}\"];", ids[i], ids[&n]);
        }
    }
    for (k, r) in roots.iter().enumerate() {
        let _ = writeln!(s, "  out{k} [label=\"output {k}\", shape=plaintext];\n  {} -> out{k};", ids[r]);
    }
    s.push_str("}\n");
    s
}
