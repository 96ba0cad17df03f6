//! The end of a tiled product's kernel (`tiled.rs`): the tile's values through shared memory to
//! the epilogue group, or, where the inner dimension is cut into slices, each slice's partial
//! tile to scratch memory and the tile's last block to finish adding the slices in slice order
//! (so the result does not depend on timing) and running the epilogue, or, where the slices are
//! the blocks of a cluster, each block adding its share of the rows from the cluster's shared
//! memory (`cluster.rs`). Where groups of threads
//! split each slab's depth (`T32x32K4`), their partial tiles are added here, in group order. The
//! epilogue walks the tile a few elements a thread at a time, all their loads before any of their
//! stores (`Emitter::tile_epilogue`), so that the walk waits for memory once a turn.

use super::ast::*;
use super::cluster;
use super::emit::{decompose, Emitter, THREADS};
use super::single::{rewrite_expr, rewrite_stmts};
use super::tiled::{acc, TilePlan};
use crate::kernel::MatMul;

/// The shared array `tile_c` in which `rows` rows of the tile's outputs are staged, a copy for
/// each group of threads; or, where they fit there, `tile_c` pointing at `a`'s slab buffers.
fn staged_tile(plan: &TilePlan, rows: usize) -> Stmt {
    assert_eq!(plan.staged_rows(), Some(rows), "the rows the plan says its finish stages");
    if plan.staged_in_slabs(rows) {
        return decl_mut(CType::FloatPtr, "tile_c", var("tile_a"));
    }
    let len = plan.staged_words(rows);
    let align = if plan.groups() > 1 { 16 } else { 0 };
    Stmt::SharedArray { ty: CType::Float, name: "tile_c".into(), len, align }
}

/// Row pitch of `tile_c`: one past the tile's width against bank conflicts, or where groups store
/// their 4x4 outputs as `float4`s (a quarter warp's eight stores one row of 128 bytes), four.
pub(super) fn staged_pitch(plan: &TilePlan) -> i64 {
    plan.bn as i64 + if plan.groups() > 1 { 4 } else { 1 }
}

/// Each thread's outputs that lie in rows `first..first + rows` of the tile, stored to its
/// group's copy in `tile_c`.
fn stage_outputs(plan: &TilePlan, first: i64, rows: usize) -> Vec<Stmt> {
    let (tm, tn) = plan.per_thread();
    let pitch = staged_pitch(plan);
    let whole = rows == plan.bm;
    let mut out = vec![];
    if plan.groups() > 1 {
        assert!(first == 0 && whole, "groups' copies of a tile are staged whole");
        let copy = var("tile_c") + var("grp") * int(rows as i64 * pitch);
        for i in 0..tm {
            let at = plan.out_row(i) * int(pitch / 4) + var("tx");
            let lanes = (0..tn).map(|j| var(acc(i, j))).collect();
            out.push(assign(Expr::Vec4(Box::new(copy.clone()), Box::new(at)), call("make_float4", lanes)));
        }
        return out;
    }
    for i in 0..tm {
        let row = plan.out_row(i);
        let mut stores = vec![];
        for j in 0..tn {
            let at = (row.clone() - int(first)) * int(pitch) + plan.out_col(j);
            stores.push(assign(index(var("tile_c"), at), var(acc(i, j))));
        }
        if whole {
            out.extend(stores);
        } else {
            let in_band =
                bin(BinOp::And, bin(BinOp::Le, int(first), row.clone()), bin(BinOp::Lt, row, int(first + rows as i64)));
            out.push(Stmt::If(in_band, stores, vec![]));
        }
    }
    out
}

/// The block's threads over every element (`r`, `q`) of the tile in row order, `step` at each.
fn walk_tile(plan: &TilePlan, step: Stmt) -> Stmt {
    Stmt::For {
        ty: CType::Int,
        var: "l".into(),
        init: cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx)),
        end: int((plan.bm * plan.bn) as i64),
        step: int(THREADS as i64),
        body: vec![
            decl(CType::Int, "r", var("l") / int(plan.bn as i64)),
            decl(CType::Int, "q", var("l") % int(plan.bn as i64)),
            step,
        ],
    }
}

/// Slice `slice`'s partial value at the tile's element (`r`, `q`), staged in the shared memory of
/// the cluster's block `slice` (its groups' copies already added into the first).
fn clustered_value(plan: &TilePlan, slice: Expr) -> Expr {
    let at = var("r") * int(staged_pitch(plan)) + var("q");
    cluster::load(var("tile_c") + at, slice)
}

/// The product's value at the tile's element (`r`, `q`) staged in `tile_c` (rows `first..first +
/// rows`): the groups' copies added in group order.
fn staged_value(plan: &TilePlan, first: i64, rows: usize) -> Expr {
    let pitch = staged_pitch(plan);
    let staged = if first == 0 { var("r") } else { var("r") - int(first) };
    let at = staged * int(pitch) + var("q");
    (1..plan.groups()).fold(index(var("tile_c"), at.clone()), |sum, g| {
        sum + index(var("tile_c"), int((g * rows) as i64 * pitch) + at.clone())
    })
}

impl<'a> Emitter<'a> {
    /// After an unsliced tile's product: the outputs through shared memory (declared by the
    /// statements returned first), so that the epilogue's threads walk the tile in row order,
    /// then the epilogue; in bands of rows where the whole tile would not fit beside the slabs.
    pub(super) fn whole_tile_finish(&mut self, mm: &MatMul, plan: TilePlan, it: CType) -> (Vec<Stmt>, Vec<Stmt>) {
        let bands = plan.bands();
        let rows = plan.bm / bands;
        let mut body = vec![];
        for band in 0..bands {
            let first = (band * rows) as i64;
            body.extend(stage_outputs(&plan, first, rows));
            body.push(Stmt::SyncThreads);
            body.push(self.tile_epilogue(mm, plan, it, Rows::Staged { first, rows }));
            if band + 1 < bands {
                // The next band overwrites the staged rows once every thread has read them.
                body.push(Stmt::SyncThreads);
            }
        }
        (vec![staged_tile(&plan, rows)], body)
    }

    /// After a slice's partial tile: written to scratch memory (through shared memory, where
    /// groups of threads add their parts), then the tile's last block to finish (its flag
    /// declared with the shared arrays returned first) adds the slices and runs the epilogue.
    pub(super) fn sliced_tile_finish(&mut self, mm: &MatMul, plan: TilePlan, it: CType) -> (Vec<Stmt>, Vec<Stmt>) {
        let (m, n, slices) = (mm.m, mm.n, plan.slices);
        let (tm, tn) = plan.per_thread();
        let scratch = self.scratch_param(CType::Float, "partial", slices * m * n * 4);
        let counters = self.scratch_param(CType::UInt, "tickets", plan.tiles_m * plan.tiles_n * 4);
        let mut shared = vec![Stmt::SharedArray { ty: CType::Bool, name: "last_block".into(), len: 1, align: 0 }];
        let inside = |row: Expr, col: Expr| {
            bin(BinOp::And, bin(BinOp::Lt, row, int(m as i64)), bin(BinOp::Lt, col, int(n as i64)))
        };
        let partial_at = |row: Expr, col: Expr| var("slice") * int((m * n) as i64) + row * int(n as i64) + col;
        let mut body = vec![];
        if plan.groups() > 1 {
            shared.push(staged_tile(&plan, plan.bm));
            body.extend(stage_outputs(&plan, 0, plan.bm));
            body.push(Stmt::SyncThreads);
            let (row, col) = (var("row0") + cast(it, var("r")), var("col0") + cast(it, var("q")));
            let write =
                assign(index(var(&scratch), partial_at(row.clone(), col.clone())), staged_value(&plan, 0, plan.bm));
            body.push(walk_tile(&plan, Stmt::If(inside(row, col), vec![write], vec![])));
        } else {
            let row = |i: usize| var("row0") + cast(it, plan.out_row(i));
            let col = |j: usize| var("col0") + cast(it, plan.out_col(j));
            for i in 0..tm {
                for j in 0..tn {
                    let store = assign(index(var(&scratch), partial_at(row(i), col(j))), var(acc(i, j)));
                    body.push(Stmt::If(inside(row(i), col(j)), vec![store], vec![]));
                }
            }
        }
        let first_thread = bin(BinOp::Eq, cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx)), int(0));
        body.extend(super::reduce::take_ticket(&counters, var("tile"), first_thread.clone(), slices));
        let last = vec![
            self.tile_epilogue(mm, plan, it, Rows::Sliced { scratch: &scratch, slices }),
            // Ready for the next launch (a replayed graph runs the same kernel again).
            Stmt::If(first_thread, vec![assign(index(var(&counters), var("tile")), Expr::ULong(0))], vec![]),
        ];
        body.push(Stmt::If(index(var("last_block"), int(0)), last, vec![]));
        (shared, body)
    }

    /// After a slice's partial tile in a cluster of the tile's slices: the partial tile staged in
    /// the block's shared memory (declared by the statements returned first), then each block adds
    /// the slices of its share of the tile's rows from the cluster's shared memory and runs the
    /// epilogue on them (`cluster.rs`).
    pub(super) fn clustered_tile_finish(&mut self, mm: &MatMul, plan: TilePlan, it: CType) -> (Vec<Stmt>, Vec<Stmt>) {
        let mut body = stage_outputs(&plan, 0, plan.bm);
        if plan.groups() > 1 {
            // The groups' copies added in group order first, into the first copy, so that the
            // other blocks read one word a slice rather than one a group.
            body.push(Stmt::SyncThreads);
            let at = var("r") * int(staged_pitch(&plan)) + var("q");
            body.push(walk_tile(&plan, assign(index(var("tile_c"), at), staged_value(&plan, 0, plan.bm))));
        }
        // Every block's partial tile staged before any is read.
        body.push(cluster::sync());
        body.push(self.tile_epilogue(mm, plan, it, Rows::Cluster { slices: plan.slices }));
        // No block leaves (its shared memory with it) while another may still read its tile.
        body.push(cluster::sync());
        (vec![staged_tile(&plan, plan.bm)], body)
    }

    /// The walk over the tile's elements (those of `rows`) that runs the epilogue group at each,
    /// the product's value read from the rows staged in shared memory, or added up from the
    /// slices' partial tiles in slice order (from scratch memory, or from the shared memory of a
    /// cluster's blocks). A thread takes up to `GATHERED` elements a turn: first each one's product
    /// value, then the epilogue at each but its stores, then the stores of those inside the
    /// product. So no load of the turn waits for a store, and the block waits for memory about
    /// once a turn; an element at a time, each element's loads came after the stores of the one
    /// before (the compiler cannot tell an in-place update's elements apart) and waited in full:
    /// 32 times a thread for a 128x64 tile's weight update. An element past the product's edge
    /// adds up the partials at its row's and column's last inside it instead, reads no input of
    /// the epilogue and stores nothing.
    fn tile_epilogue(&mut self, mm: &MatMul, plan: TilePlan, it: CType, rows: Rows) -> Stmt {
        let (m, n, bn) = (mm.m as i64, mm.n as i64, plan.bn as i64);
        let mut ahead = vec![];
        // The walk's first row, its length in elements, and its most elements.
        let (first, end, most) = match rows {
            Rows::Staged { first, rows } => (int(first), int(rows as i64 * bn), rows * plan.bn),
            Rows::Sliced { .. } => (int(0), int(plan.bm as i64 * bn), plan.bm * plan.bn),
            Rows::Cluster { .. } => {
                // Rows in shares of `per`, the last share shorter.
                let (per, bm) = (plan.cluster_share() as i64, plan.bm as i64);
                ahead.push(decl(CType::Int, "rows_first", cast(CType::Int, var("slice")) * int(per)));
                let short = bin(BinOp::Lt, int(bm) - var("rows_first"), int(per));
                ahead.push(decl(CType::Int, "rows_here", select(short, int(bm) - var("rows_first"), int(per))));
                (var("rows_first"), var("rows_here") * int(bn), per as usize * plan.bn)
            }
        };
        let per_turn = most.div_ceil(THREADS as usize).clamp(1, GATHERED);
        // Staged and sliced walks come in whole turns (tiles are multiples of 1024 elements).
        let whole_turns = most % (per_turn * THREADS as usize) == 0 && !matches!(rows, Rows::Cluster { .. });
        // The epilogue at one element, from `t` (its flat index) and `tile_value`.
        let shape = self.group[0].kernel.shape.clone();
        let mut epilogue = vec![];
        decompose(var("t"), &shape, 0, it, &mut epilogue);
        for mem in 0..self.group.len() {
            self.member_element(mem, shape.len(), &mut epilogue);
        }
        // An epilogue of declarations, assignments to them and stores (every elementwise one) is
        // split into its stores and the rest; any other runs whole at each element, in order.
        let plain =
            epilogue.iter().all(|s| matches!(s, Stmt::Decl { .. } | Stmt::Assign(Expr::Var(_) | Expr::Index(..), _)));
        // Inputs that nothing in the kernel writes (`const __restrict__`) are read at an element
        // outside too (its `t` is clamped inside the product): ptxas placed predicated loads of
        // them after the stores of the elements before (a tensor-core ReLU gradient's walk waited
        // for memory at each element), and issues the turn's unpredicated loads first.
        let read_only: std::collections::HashSet<String> =
            self.group_params().0.into_iter().filter(|p| p.kind == ParamKind::In).map(|p| p.name).collect();
        let (mut values, mut computed, mut stores) = (vec![], vec![], vec![]);
        for u in 0..per_turn {
            let name = |what: &str| format!("{what}_{u}");
            let l = var("l") + int((u * THREADS as usize) as i64);
            let in_walk = bin(BinOp::Lt, l.clone(), end.clone());
            let l = if whole_turns { l } else { select(in_walk.clone(), l, end.clone() - int(1)) };
            let r = if first == int(0) { l.clone() / int(bn) } else { first.clone() + l.clone() / int(bn) };
            values.push(decl(CType::Int, name("r"), r));
            values.push(decl(CType::Int, name("q"), l % int(bn)));
            let (row, col) = (var(name("row")), var(name("col")));
            values.push(decl(it, name("row"), var("row0") + cast(it, var(name("r")))));
            values.push(decl(it, name("col"), var("col0") + cast(it, var(name("q")))));
            let inside = bin(BinOp::And, bin(BinOp::Lt, row.clone(), int(m)), bin(BinOp::Lt, col.clone(), int(n)));
            let inside = if whole_turns { inside } else { bin(BinOp::And, in_walk, inside) };
            values.push(decl(CType::Bool, name("inside"), inside));
            let row = select(bin(BinOp::Lt, row.clone(), int(m)), row, int(m - 1));
            let col = select(bin(BinOp::Lt, col.clone(), int(n)), col, int(n - 1));
            values.push(decl(it, name("t"), row * int(n) + col));
            let at_element: std::collections::HashMap<String, String> =
                ["r", "q", "t"].iter().map(|v| (v.to_string(), name(v))).collect();
            let value = name("tile_value");
            match rows {
                Rows::Staged { first, rows } => {
                    let mut staged = staged_value(&plan, first, rows);
                    rewrite_expr(&mut staged, &at_element, &|_| None);
                    values.push(decl(CType::Float, &value, staged));
                }
                Rows::Sliced { scratch, slices } => {
                    // `__ldcg` reads through L2, where the other blocks' partial tiles are.
                    values.push(decl_mut(CType::Float, &value, Expr::F32(0.0)));
                    for s in 0..slices {
                        let partial = call("__ldcg", vec![var(scratch) + (int(s as i64 * m * n) + var(name("t")))]);
                        values.push(assign(var(&value), var(&value) + partial));
                    }
                }
                Rows::Cluster { slices } => {
                    values.push(decl_mut(CType::Float, &value, Expr::F32(0.0)));
                    for s in 0..slices {
                        let mut slice_value = clustered_value(&plan, Expr::UInt(s as u32));
                        rewrite_expr(&mut slice_value, &at_element, &|_| None);
                        values.push(assign(var(&value), var(&value) + slice_value));
                    }
                }
            }
            let inside = var(name("inside"));
            if !plain {
                // In order and under its bounds check, as a scope of its own.
                let mut at = vec![decl(CType::Float, "tile_value", var(&value)), decl(it, "t", var(name("t")))];
                at.extend(epilogue.iter().cloned());
                computed.push(Stmt::If(inside, at, vec![]));
                continue;
            }
            // The epilogue's own names, and `t` and `tile_value`, suffixed with the element's.
            let mut names = at_element;
            names.insert("tile_value".into(), value);
            for st in &epilogue {
                if let Stmt::Decl { name: declared, .. } = st {
                    names.insert(declared.clone(), name(declared));
                }
            }
            for st in &epilogue {
                let mut st = st.clone();
                if let Stmt::Decl { name: declared, .. } = &mut st {
                    *declared = names[declared.as_str()].clone();
                }
                rewrite_stmts(std::slice::from_mut(&mut st), &names, &|_| None);
                match st {
                    store @ Stmt::Assign(Expr::Index(..), _) => {
                        stores.push(Stmt::If(inside.clone(), vec![store], vec![]))
                    }
                    // An element outside reads nothing of an input the kernel writes: an in-place
                    // update's element there is another thread's (a predicated load, which the
                    // compiler may still hoist).
                    Stmt::Decl { ty, name: declared, init: Some(read), constant }
                        if read.reads_memory() && !reads_only_from(&read, &read_only) =>
                    {
                        let init = Some(select(inside.clone(), read, cast(ty, int(0))));
                        computed.push(Stmt::Decl { ty, name: declared, init, constant })
                    }
                    other => computed.push(other),
                }
            }
        }
        let first_element = cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx));
        let turn = [values, computed, stores].concat();
        // One turn covers the walk: no loop (which the compiler would unroll across a count it
        // cannot see, each turn's loads behind the stores of the one before).
        let walk = if most <= per_turn * THREADS as usize {
            Stmt::Block([vec![decl(CType::Int, "l", first_element)], turn].concat())
        } else {
            Stmt::For {
                ty: CType::Int,
                var: "l".into(),
                init: first_element,
                end,
                step: int((per_turn * THREADS as usize) as i64),
                body: turn,
            }
        };
        if ahead.is_empty() {
            walk
        } else {
            ahead.push(walk);
            Stmt::Block(ahead)
        }
    }
}

/// Whether every array `e` reads is one of `arrays`.
fn reads_only_from(e: &Expr, arrays: &std::collections::HashSet<String>) -> bool {
    let from = |e: &Expr| reads_only_from(e, arrays);
    match e {
        Expr::Index(base, at) | Expr::Vec4(base, at) => {
            matches!(&**base, Expr::Var(name) if arrays.contains(name)) && from(at)
        }
        Expr::Call(_, args) => args.iter().all(from),
        Expr::Neg(a) | Expr::Not(a) | Expr::Cast(_, a) | Expr::Lane(a, _) => from(a),
        Expr::Binary(_, a, b) => from(a) && from(b),
        Expr::Select(c, a, b) => from(c) && from(a) && from(b),
        _ => true,
    }
}

/// Elements of a tile a thread runs the epilogue at in one turn of its walk.
const GATHERED: usize = 4;

/// The rows of a tile that an epilogue walk covers, and where their product values are.
#[derive(Clone, Copy)]
enum Rows<'s> {
    /// `rows` rows from `first`, staged in shared memory (`tile_c`).
    Staged { first: i64, rows: usize },
    /// Every row, added up from the partial tiles of `slices` slices in scratch memory.
    Sliced { scratch: &'s str, slices: usize },
    /// The calling block's share of the rows, added up from the partial tiles staged in the
    /// shared memory of the `slices` blocks of its cluster.
    Cluster { slices: usize },
}
