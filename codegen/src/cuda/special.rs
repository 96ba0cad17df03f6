//! Kernels that are not loop kernels: take and its gradient (indices checked in the kernel; the
//! gradient sums each output's rows in index order, so it needs no atomics and is deterministic),
//! Philox random numbers (bit for bit the reference's for uniform and bernoulli), and integer
//! products, which cuBLAS does not have.

use super::ast::*;
use super::emit::{
    grid_stride_loop, launch_1d, DeviceStep, Emitter, ErrorSite, KernelArg, Launchable, ProductInEpilogue,
};
use super::group::{forwarded, same_view};
use super::scalar::literal;
use crate::kernel::{step_reads, BufId, BufKind, Gather, LoopKernel, MatMul};
use kiln_ir::ops::{BinaryOp, Distribution, RandomOp};
use kiln_ir::DType;

impl<'a> Emitter<'a> {
    pub(super) fn gather(&mut self, g: &Gather, name: &str, scatter: bool) {
        let it = CType::LongLong;
        let idx_t = CType::of(self.kp.buffers[g.idx].dtype);
        let value_t = CType::of(g.dtype);
        let n = self.kp.buffers[g.idx].len;
        self.errors.push(ErrorSite { op: if scatter { "take_grad" } else { "take" }, at: g.at, axis_len: g.axis_len });
        let code = self.errors.len() as i64;
        let axis = int(g.axis_len as i64);
        // `a` is index `j` made non-negative; out of range sets the error word and reads element 0.
        let normalize = |j: Expr, a: &str| -> Vec<Stmt> {
            vec![
                decl_mut(CType::LongLong, a, cast(CType::LongLong, index(var("idx"), j))),
                Stmt::If(bin(BinOp::Lt, var(a), int(0)), vec![assign(var(a), var(a) + axis.clone())], vec![]),
                Stmt::If(
                    bin(BinOp::Or, bin(BinOp::Lt, var(a), int(0)), bin(BinOp::Ge, var(a), axis.clone())),
                    vec![
                        Stmt::Call(call("atomicMin", vec![var("error"), Expr::UInt(code as u32)])),
                        assign(var(a), int(-1)),
                    ],
                    vec![],
                ),
            ]
        };
        let inner = int(g.inner as i64);
        let mut body = vec![];
        let total;
        if !scatter {
            total = g.outer * n * g.inner;
            body.push(decl(it, "e", var("t") % inner.clone()));
            body.push(decl(it, "q", var("t") / inner.clone()));
            body.push(decl(it, "j", var("q") % int(n as i64)));
            body.push(decl(it, "o", var("q") / int(n as i64)));
            body.extend(normalize(var("j"), "a"));
            let safe = select(bin(BinOp::Lt, var("a"), int(0)), int(0), var("a"));
            let from = (var("o") * axis.clone() + safe) * inner.clone() + var("e");
            body.push(assign(index(var("out"), var("t")), index(var("src"), from)));
        } else {
            total = g.outer * g.axis_len * g.inner;
            body.push(decl(it, "e", var("t") % inner.clone()));
            body.push(decl(it, "q", var("t") / inner.clone()));
            body.push(decl(it, "a", var("q") % axis.clone()));
            body.push(decl(it, "o", var("q") / axis.clone()));
            body.push(decl_mut(value_t, "acc", literal(g.dtype, 0.0)));
            // Each output sums its rows in index order, as the reference does: deterministic, no atomics.
            let mut per_j = normalize(var("j"), "b");
            let from = (var("o") * int(n as i64) + var("j")) * inner.clone() + var("e");
            per_j.push(Stmt::If(
                bin(BinOp::Eq, var("b"), var("a")),
                vec![assign(var("acc"), var("acc") + index(var("src"), from))],
                vec![],
            ));
            body.push(Stmt::For {
                ty: it,
                var: "j".into(),
                init: int(0),
                end: int(n as i64),
                step: int(1),
                body: per_j,
            });
            body.push(assign(index(var("out"), var("t")), var("acc")));
        }
        let params = vec![
            Param { ty: value_t, name: "src".into(), kind: ParamKind::In },
            Param { ty: idx_t, name: "idx".into(), kind: ParamKind::In },
            Param { ty: value_t, name: "out".into(), kind: ParamKind::Out },
            Param { ty: CType::UInt, name: "error".into(), kind: ParamKind::InOut },
        ];
        let launch = launch_1d(total);
        let loop_ = grid_stride_loop(it, "t", total, body);
        let what = if scatter { "take_grad (scatter-add)" } else { "take" };
        self.kernels.push(Kernel::plain(
            name,
            vec![format!("{name} computes {what} at {}", g.at)],
            params,
            vec![loop_],
            launch,
        ));
        let args = vec![KernelArg::Buf(g.src), KernelArg::Buf(g.idx), KernelArg::Buf(g.out), KernelArg::ErrorFlag];
        self.steps.push(DeviceStep::Launch(Launchable { kernel: name.into(), args, launch }));
    }

    pub(super) fn random(&mut self, op: &RandomOp, state: BufId, out: BufId, name: &str) {
        let n = self.kp.buffers[out].len;
        let f32 = op.dtype != DType::F64;
        let per_block = kiln_ir::ops::random::values_per_block(op);
        let blocks = n.div_ceil(per_block);
        let (u32t, u64t) = (CType::UInt, CType::ULongLong);
        let mut body = vec![];
        body.push(decl(u64t, "seed", cast(u64t, index(var("state"), int(0)))));
        body.push(decl(u64t, "call", cast(u64t, index(var("state"), int(1)))));
        // Philox 4x32-10, as kiln-ir's random module defines it.
        let mut per = vec![
            decl_mut(u32t, "c0", cast(u32t, var("b"))),
            decl_mut(u32t, "c1", Expr::ULong(op.stream as u64)),
            decl_mut(u32t, "c2", cast(u32t, var("call"))),
            decl_mut(u32t, "c3", cast(u32t, bin(BinOp::Shr, var("call"), int(32)))),
            decl_mut(u32t, "k0", cast(u32t, var("seed"))),
            decl_mut(u32t, "k1", cast(u32t, bin(BinOp::Shr, var("seed"), int(32)))),
        ];
        let mut round = vec![];
        round.push(decl(u64t, "p0", cast(u64t, Expr::ULong(0xD251_1F53)) * cast(u64t, var("c0"))));
        round.push(decl(u64t, "p1", cast(u64t, Expr::ULong(0xCD9E_8D57)) * cast(u64t, var("c2"))));
        let hi = |p: &str| cast(u32t, bin(BinOp::Shr, var(p), int(32)));
        round.push(decl(u32t, "n0", bin(BinOp::BitXor, bin(BinOp::BitXor, hi("p1"), var("c1")), var("k0"))));
        round.push(decl(u32t, "n2", bin(BinOp::BitXor, bin(BinOp::BitXor, hi("p0"), var("c3")), var("k1"))));
        round.push(assign(var("c1"), cast(u32t, var("p1"))));
        round.push(assign(var("c3"), cast(u32t, var("p0"))));
        round.push(assign(var("c0"), var("n0")));
        round.push(assign(var("c2"), var("n2")));
        round.push(Stmt::Compound(BinOp::Add, var("k0"), Expr::ULong(0x9E37_79B9)));
        round.push(Stmt::Compound(BinOp::Add, var("k1"), Expr::ULong(0xBB67_AE85)));
        per.push(counted_loop("round", 10, 1, round));
        let w = |i: usize| var(format!("c{i}"));
        let u24 = |x: Expr| cast(CType::Float, bin(BinOp::Shr, x, int(8))) * Expr::F32(1.0 / 16_777_216.0);
        let u53 = |a: Expr, b: Expr| {
            cast(
                CType::Double,
                bin(BinOp::BitXor, bin(BinOp::Shl, cast(u64t, a), int(21)), bin(BinOp::Shr, cast(u64t, b), int(11))),
            ) * Expr::F64(1.0 / 9_007_199_254_740_992.0)
        };
        let value_t = CType::of(op.dtype);
        for lane in 0..per_block {
            let value = match op.dist {
                Distribution::Bernoulli { p } => {
                    let hit = bin(
                        BinOp::Lt,
                        cast(CType::Double, bin(BinOp::Shr, w(lane), int(8))),
                        Expr::F64(p * 16_777_216.0),
                    );
                    if op.dtype == DType::Bool {
                        hit
                    } else {
                        cast(value_t, hit)
                    }
                }
                // Rounded steps, never contracted to a fused multiply-add: the same bits as the CPU.
                Distribution::Uniform { low, high } if f32 => {
                    let (lo, hi) = (low as f32, high as f32);
                    call("__fadd_rn", vec![Expr::F32(lo), call("__fmul_rn", vec![Expr::F32(hi - lo), u24(w(lane))])])
                }
                Distribution::Uniform { low, high } => call(
                    "__dadd_rn",
                    vec![
                        Expr::F64(low),
                        call("__dmul_rn", vec![Expr::F64(high - low), u53(w(2 * lane), w(2 * lane + 1))]),
                    ],
                ),
                Distribution::Normal { mean, std } if f32 => {
                    let u1 = cast(CType::Float, bin(BinOp::Shr, w(2 * lane), int(8)) + int(1))
                        * Expr::F32(1.0 / 16_777_216.0);
                    let u2 = u24(w(2 * lane + 1));
                    let z = call("sqrtf", vec![Expr::F32(-2.0) * call("logf", vec![u1])])
                        * call("cosf", vec![Expr::F32(std::f32::consts::TAU) * u2]);
                    Expr::F32(mean as f32) + Expr::F32(std as f32) * z
                }
                Distribution::Normal { mean, std } => {
                    let u1 = u53(w(0), w(1)) + Expr::F64(1.0 / 9_007_199_254_740_992.0);
                    let u2 = u53(w(2), w(3));
                    let z = call("sqrt", vec![Expr::F64(-2.0) * call("log", vec![u1])])
                        * call("cos", vec![Expr::F64(std::f64::consts::TAU) * u2]);
                    Expr::F64(mean) + Expr::F64(std) * z
                }
            };
            let i = var("b") * int(per_block as i64) + int(lane as i64);
            per.push(Stmt::If(
                bin(BinOp::Lt, i.clone(), int(n as i64)),
                vec![assign(index(var("out"), i), value)],
                vec![],
            ));
        }
        let it = CType::LongLong;
        body.push(grid_stride_loop(it, "b", blocks, per));
        let params = vec![
            Param { ty: CType::LongLong, name: "state".into(), kind: ParamKind::In },
            Param { ty: value_t, name: "out".into(), kind: ParamKind::Out },
        ];
        let launch = launch_1d(blocks);
        self.kernels.push(Kernel::plain(
            name,
            vec![format!("{name} draws {} from Philox 4x32-10", op.label())],
            params,
            body,
            launch,
        ));
        let args = vec![KernelArg::Buf(state), KernelArg::Buf(out)];
        self.steps.push(DeviceStep::Launch(Launchable { kernel: name.into(), args, launch }));
    }

    /// A product computed by kiln's own kernel, one thread per output element (adjacent threads,
    /// adjacent columns, so reads of `b` coalesce): integer products (cuBLAS has none; wrapping
    /// arithmetic) and float products too small for a cuBLAS call to pay for itself.
    /// Declares `acc` as element `flat` of `mm`'s result (row-major over `[batch, m, n]`), a dot
    /// product over `a` and `b` (the parameters `{operands}a`, `{operands}b`).
    fn dot_product(&mut self, mm: &MatMul, it: CType, flat: &str, acc: &str, operands: &str) -> Vec<Stmt> {
        let t = CType::of(mm.dtype);
        let (m, k, n) = (mm.m as i64, mm.k as i64, mm.n as i64);
        let (i, j, bi, p) = (format!("{acc}_i"), format!("{acc}_j"), format!("{acc}_b"), format!("{acc}_p"));
        let mut body = vec![
            decl(it, &j, var(flat) % int(n)),
            decl(it, &i, (var(flat) / int(n)) % int(m)),
            decl(it, &bi, var(flat) / int(m * n)),
            decl_mut(t, acc, int(0)),
        ];
        let a_at = var(&bi) * int(mm.a_batch_stride as i64)
            + if mm.a_transposed { var(&p) * int(m) + var(&i) } else { var(&i) * int(k) + var(&p) };
        let b_at = var(&bi) * int(mm.b_batch_stride as i64)
            + if mm.b_transposed { var(&j) * int(k) + var(&p) } else { var(&p) * int(n) + var(&j) };
        let (a, b) = (var(format!("{operands}a")), var(format!("{operands}b")));
        let prod = self.scalars.binary(BinaryOp::Mul, mm.dtype, index(a, a_at), index(b, b_at));
        let sum = self.scalars.binary(BinaryOp::Add, mm.dtype, var(acc), prod);
        body.push(Stmt::For {
            ty: it,
            var: p,
            init: int(0),
            end: int(k),
            step: int(1),
            body: vec![assign(var(acc), sum)],
        });
        body
    }

    /// `acc` as element `flat` of the product computed inside the group being emitted.
    pub(super) fn product_element(&mut self, mm: &MatMul, it: CType, flat: &str, acc: &str) -> Vec<Stmt> {
        self.dot_product(mm, it, flat, acc, "mm_")
    }

    /// Whether `mm` (a small product, no batch) can be computed by the threads of its epilogue
    /// group `members` (the epilogue first) instead of a kernel of its own: its result is read by
    /// the epilogue through exactly one input and by no other member from memory, and no member
    /// writes the product's operands, or its result at another element than the one it reads; and
    /// nothing reads the result after the group.
    pub(super) fn product_in_epilogue(
        &self,
        mm: &MatMul,
        members: &[&LoopKernel],
        at: usize,
    ) -> Option<ProductInEpilogue> {
        if mm.batch != 1 {
            return None;
        }
        let loc = &self.loc;
        let (la, lb, lc) = (loc[mm.a], loc[mm.b], loc[mm.c]);
        let epilogue = members[0];
        let reads: Vec<usize> = (0..epilogue.inputs.len()).filter(|&j| loc[epilogue.inputs[j].buf] == lc).collect();
        let [input] = reads[..] else { return None };
        let view = &epilogue.inputs[input];
        if view.buf != mm.c {
            return None;
        }
        for (m, k) in members.iter().enumerate().skip(1) {
            let sources = forwarded(loc, members, m);
            if k.inputs.iter().zip(&sources).any(|(v, s)| s.is_none() && loc[v.buf] == lc) {
                return None;
            }
        }
        let ok_writes = members.iter().all(|k| {
            let l = loc[k.out.buf];
            l != la && l != lb && (l != lc || same_view(&k.out, view))
        });
        if !ok_writes {
            return None;
        }
        // The lowering gives a product an epilogue only when nothing else reads it; should that
        // change, a product read again later keeps its own kernel.
        let read_later = self.kp.outputs.contains(&mm.c)
            || !matches!(self.kp.buffers[mm.c].kind, BufKind::Temp)
            || self.kp.steps[at + 1..].iter().any(|s| step_reads(s).contains(&mm.c));
        (!read_later).then(|| ProductInEpilogue { mm: mm.clone(), input, tiled: None })
    }

    pub(super) fn direct_matmul(&mut self, mm: &MatMul) {
        let big = [mm.batch * mm.m * mm.n, self.kp.buffers[mm.a].len, self.kp.buffers[mm.b].len];
        let it = if big.iter().all(|&n| n < i32::MAX as usize / 2) { CType::Int } else { CType::LongLong };
        let t = CType::of(mm.dtype);
        let total = mm.batch * mm.m * mm.n;
        let mut body = self.dot_product(mm, it, "t", "acc", "");
        body.push(assign(index(var("c"), var("t")), var("acc")));
        let params = vec![
            Param { ty: t, name: "a".into(), kind: ParamKind::In },
            Param { ty: t, name: "b".into(), kind: ParamKind::In },
            Param { ty: t, name: "c".into(), kind: ParamKind::Out },
        ];
        let launch = launch_1d(total);
        let comments =
            mm.origin.iter().map(|o| format!("{} computes {o} ({}x{}x{})", mm.name, mm.m, mm.k, mm.n)).collect();
        let loop_ = grid_stride_loop(it, "t", total, body);
        self.kernels.push(Kernel::plain(&mm.name, comments, params, vec![loop_], launch));
        let args = vec![KernelArg::Buf(mm.a), KernelArg::Buf(mm.b), KernelArg::Buf(mm.c)];
        self.steps.push(DeviceStep::Launch(Launchable { kernel: mm.name.clone(), args, launch }));
    }
}
