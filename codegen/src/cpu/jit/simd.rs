//! The SIMD form of a loop kernel's innermost loop: whole vectors of f32x4 or f64x2 (the widths
//! Cranelift's x86-64 backend offers), then the scalar body over the tail. Used for elementwise
//! kernels whose views are all contiguous or broadcast along the innermost dim and whose ops all
//! have vector forms; comparisons produce lane masks that `where`, `and`, `or` and `not` combine.
//! Results are bit for bit those of the scalar body (`tests/cpu_simd.rs`).

use super::*;

impl Emitter<'_> {
    /// Vector lanes for the innermost loop, when this kernel can run it in SIMD: elementwise, every
    /// view contiguous or broadcast along the innermost dim, one float dtype throughout (booleans
    /// only as comparison masks), and only ops with a vector form.
    pub(super) fn simd_lanes(&self) -> Option<usize> {
        let r = self.k.shape.len();
        if self.k.reduce.is_some() || r == 0 {
            return None;
        }
        self.lanes_along(r - 1)
    }

    /// Vector lanes for the innermost kept dim of a sum or mean over outer dims (a column sum, say):
    /// that dim then runs `lanes` outputs at a time, each accumulated in f64 in the scalar path's
    /// order, so the results are the scalar path's bit for bit.
    pub(super) fn outer_reduction_lanes(&self) -> Option<usize> {
        let (op, _) = self.k.reduce?;
        if !matches!(op, ReduceOp::Sum | ReduceOp::Mean) || self.kept == 0 {
            return None;
        }
        self.lanes_along(self.kept - 1)
    }

    /// Vector lanes for the innermost reduced dim of a sum, mean, max or min (a row sum, say): whole
    /// vectors go to vector accumulators (f64x2 pairs for sums, as the scalar path accumulates in
    /// f64), folded with the scalar tail at the end. Max and min give the scalar path's result
    /// exactly; sums add in another order, within an f64 rounding of it.
    pub(super) fn inner_reduction_lanes(&self) -> Option<usize> {
        let (op, n) = self.k.reduce?;
        let r = self.k.shape.len();
        if !matches!(op, ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min) || n == 0 {
            return None;
        }
        self.lanes_along_inputs(r - 1)
    }

    /// Declares and initializes the vector accumulators when the innermost reduced dim runs in
    /// SIMD.
    pub(super) fn init_vector_accs(&mut self) {
        let Some(lanes) = self.inner_reduction_lanes() else { return };
        let (op, _) = self.k.reduce.expect("reduction");
        let (ty, count, init) = match op {
            ReduceOp::Max => (self.vector_type(lanes), 1, f64::NEG_INFINITY),
            ReduceOp::Min => (self.vector_type(lanes), 1, f64::INFINITY),
            _ => (types::F64X2, lanes / 2, 0.0),
        };
        let s = if ty == types::F32X4 { self.b.ins().f32const(init as f32) } else { self.b.ins().f64const(init) };
        let v = self.b.ins().splat(ty, s);
        self.vector_accs = (0..count)
            .map(|_| {
                let acc = self.b.declare_var(ty);
                self.b.def_var(acc, v);
                acc
            })
            .collect();
    }

    fn vector_type(&self, lanes: usize) -> Type {
        if lanes == 4 {
            types::F32X4
        } else {
            types::F64X2
        }
    }

    /// One vector of the reduced dim into the vector accumulators.
    pub(super) fn inner_reduction_simd(&mut self, lanes: usize) {
        let (op, _) = self.k.reduce.expect("reduction");
        let v = self.vector_value(lanes, self.k.shape.len() - 1);
        let parts = match op {
            ReduceOp::Max | ReduceOp::Min => vec![v],
            _ if lanes == 4 => {
                let (lo, hi) = self.promote_halves(v);
                vec![lo, hi]
            }
            _ => vec![v],
        };
        for (&acc, x) in self.vector_accs.clone().iter().zip(parts) {
            let cur = self.b.use_var(acc);
            let new = match op {
                ReduceOp::Max => self.b.ins().fmax(cur, x),
                ReduceOp::Min => self.b.ins().fmin(cur, x),
                _ => self.b.ins().fadd(cur, x),
            };
            self.b.def_var(acc, new);
        }
    }

    /// Folds the vector accumulators, lane by lane, into the scalar accumulator.
    pub(super) fn fold_vector_accs(&mut self) {
        if self.vector_accs.is_empty() {
            return;
        }
        let (op, _) = self.k.reduce.expect("reduction");
        let acc = self.acc.expect("accumulator");
        let mut total = None;
        for v in std::mem::take(&mut self.vector_accs) {
            let vec = self.b.use_var(v);
            let lanes = if self.b.func.dfg.value_type(vec) == types::F32X4 { 4 } else { 2 };
            for lane in 0..lanes {
                let x = self.b.ins().extractlane(vec, lane as u8);
                total = Some(match total {
                    None => x,
                    Some(t) => match op {
                        ReduceOp::Max => self.b.ins().fmax(t, x),
                        ReduceOp::Min => self.b.ins().fmin(t, x),
                        _ => self.b.ins().fadd(t, x),
                    },
                });
            }
        }
        let (total, cur) = (total.expect("at least one accumulator"), self.b.use_var(acc));
        let new = match op {
            ReduceOp::Max => self.b.ins().fmax(cur, total),
            ReduceOp::Min => self.b.ins().fmin(cur, total),
            _ => self.b.ins().fadd(cur, total),
        };
        self.b.def_var(acc, new);
    }

    /// Lanes along dim `d` when the output and every input are contiguous or broadcast along it,
    /// all in one float dtype (booleans only as comparison masks), with only ops that have a
    /// vector form, and the dim is at least a vector long.
    fn lanes_along(&self, d: usize) -> Option<usize> {
        (self.k.out.strides[d] == 1).then(|| self.lanes_along_inputs(d)).flatten()
    }

    /// `lanes_along` without the output (which does not move along a reduced dim).
    fn lanes_along_inputs(&self, d: usize) -> Option<usize> {
        use ScalarExpr::*;
        let f = self.k.out_dtype;
        let lanes = match f {
            DType::F32 => 4,
            DType::F64 => 2,
            _ => return None,
        };
        let contiguous =
            self.k.inputs.iter().all(|v| matches!(v.strides[d], 0 | 1)) && self.k.input_dtypes.iter().all(|&d| d == f);
        let ops_ok = self.k.exprs.iter().zip(&self.dtypes).all(|(e, &d)| {
            let typed = d == f || d == DType::Bool;
            typed
                && match e {
                    Input(_) | Where(..) => true,
                    Const(c) => c.dtype() == f,
                    Unary(op, _) if math::is_transcendental(*op) => true,
                    Unary(op, _) => matches!(
                        op,
                        UnaryOp::Neg
                            | UnaryOp::Abs
                            | UnaryOp::Sqrt
                            | UnaryOp::Floor
                            | UnaryOp::Ceil
                            | UnaryOp::Reciprocal
                            | UnaryOp::Rsqrt
                            | UnaryOp::Relu
                            | UnaryOp::Not
                    ),
                    // comparisons of booleans would compare masks as floats
                    Binary(op, a, _) => !(op.is_comparison() && self.dtypes[*a] == DType::Bool),
                }
        });
        (contiguous && ops_ok && self.result_dtype() == f && self.k.shape[d] >= lanes).then_some(lanes)
    }

    /// One vector of results: contiguous operands are loaded as vectors, broadcast ones splatted;
    /// booleans are lane masks.
    pub(super) fn body_simd(&mut self, lanes: usize) -> Result<()> {
        let r = self.vector_value(lanes, self.k.shape.len() - 1);
        let out = self.addr[self.addr.len() - 1];
        let a = self.b.use_var(out);
        self.b.ins().store(MemFlagsData::new().with_notrap(), r, a, 0);
        Ok(())
    }

    /// The kernel's value for `lanes` consecutive indices of dim `d` (see `lanes_along`).
    fn vector_value(&mut self, lanes: usize, d: usize) -> Value {
        use ScalarExpr::*;
        let f = self.k.out_dtype;
        let vt = if lanes == 4 { types::F32X4 } else { types::F64X2 };
        let mut regs: Vec<Value> = Vec::with_capacity(self.k.exprs.len());
        for e in &self.k.exprs {
            let as_float = |b: &mut FunctionBuilder, m: Value| {
                b.ins().bitcast(vt, MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little), m)
            };
            let v = match *e {
                Input(j) => {
                    let a = self.b.use_var(self.addr[j]);
                    if self.k.inputs[j].strides[d] == 1 {
                        // Element-aligned only: never claim 16-byte alignment for a vector.
                        self.b.ins().load(vt, MemFlagsData::new().with_notrap(), a, 0)
                    } else {
                        let s = self.b.ins().load(clif_type(f), MemFlagsData::trusted(), a, 0);
                        self.b.ins().splat(vt, s)
                    }
                }
                Const(c) => {
                    let s = self.fconst(f, c.as_f64());
                    self.b.ins().splat(vt, s)
                }
                Unary(op, a) if math::is_transcendental(op) => {
                    let x = regs[a];
                    let mode = math_mode(true, f);
                    if f == DType::F32 && math::computes_in_f32(op) {
                        math::unary(&mut self.b, op, x, mode)
                    } else {
                        self.on_f64_lanes(f, &[x], &mut |b, v| math::unary(b, op, v[0], mode))
                    }
                }
                Unary(op, a) => {
                    let x = regs[a];
                    match op {
                        UnaryOp::Neg => self.b.ins().fneg(x),
                        UnaryOp::Abs => self.b.ins().fabs(x),
                        UnaryOp::Sqrt => self.b.ins().sqrt(x),
                        UnaryOp::Floor => self.b.ins().floor(x),
                        UnaryOp::Ceil => self.b.ins().ceil(x),
                        UnaryOp::Not => self.b.ins().bnot(x),
                        UnaryOp::Reciprocal | UnaryOp::Rsqrt => {
                            let one = self.fconst(f, 1.0);
                            let one = self.b.ins().splat(vt, one);
                            let den = if op == UnaryOp::Rsqrt { self.b.ins().sqrt(x) } else { x };
                            self.b.ins().fdiv(one, den)
                        }
                        UnaryOp::Relu => {
                            let z = self.fconst(f, 0.0);
                            let z = self.b.ins().splat(vt, z);
                            let neg = self.b.ins().fcmp(FloatCC::LessThan, x, z);
                            let neg = as_float(&mut self.b, neg);
                            self.b.ins().bitselect(neg, z, x)
                        }
                        _ => unreachable!("simd_lanes admits only these"),
                    }
                }
                Binary(op, a, b) => {
                    let (x, y) = (regs[a], regs[b]);
                    match op {
                        BinaryOp::Add => self.b.ins().fadd(x, y),
                        BinaryOp::Sub => self.b.ins().fsub(x, y),
                        BinaryOp::Mul => self.b.ins().fmul(x, y),
                        BinaryOp::Div => self.b.ins().fdiv(x, y),
                        BinaryOp::Maximum => self.b.ins().fmax(x, y),
                        BinaryOp::Minimum => self.b.ins().fmin(x, y),
                        BinaryOp::Pow => {
                            let mode = math_mode(true, f);
                            self.on_f64_lanes(f, &[x, y], &mut |b, v| math::pow(b, v[0], v[1], mode))
                        }
                        BinaryOp::And => self.b.ins().band(x, y),
                        BinaryOp::Or => self.b.ins().bor(x, y),
                        cmp => {
                            let m = self.b.ins().fcmp(float_cc(cmp), x, y);
                            as_float(&mut self.b, m)
                        }
                    }
                }
                Where(c, a, b) => self.b.ins().bitselect(regs[c], regs[a], regs[b]),
            };
            regs.push(v);
        }
        *regs.last().expect("non-empty kernel")
    }

    /// A sum or mean over the dims after `d`, for `lanes` consecutive outputs along the kept dim
    /// `d` (see `outer_reduction_lanes`): one f64x2 accumulator per two outputs, the reduced dims'
    /// loops inside, then the outputs stored as one vector.
    pub(super) fn outer_reduction_simd(&mut self, d: usize, lanes: usize) -> Result<()> {
        let zero = self.b.ins().f64const(0.0);
        let zero = self.b.ins().splat(types::F64X2, zero);
        let accs: Vec<Variable> = (0..lanes / 2)
            .map(|_| {
                let v = self.b.declare_var(types::F64X2);
                self.b.def_var(v, zero);
                v
            })
            .collect();
        self.reduced_loops(d + 1, lanes, &accs)?;
        let (op, _) = self.k.reduce.expect("reduction");
        let count: usize = self.k.shape[self.kept..].iter().product();
        let mut sums: Vec<Value> = accs.iter().map(|&a| self.b.use_var(a)).collect();
        if op == ReduceOp::Mean {
            let c = self.b.ins().f64const(count as f64);
            let c = self.b.ins().splat(types::F64X2, c);
            sums = sums.into_iter().map(|s| self.b.ins().fdiv(s, c)).collect();
        }
        let v = if lanes == 4 { self.merge_halves(sums[0], sums[1]) } else { sums[0] };
        let out = self.addr[self.addr.len() - 1];
        let a = self.b.use_var(out);
        self.b.ins().store(MemFlagsData::new().with_notrap(), v, a, 0);
        Ok(())
    }

    fn reduced_loops(&mut self, d: usize, lanes: usize, accs: &[Variable]) -> Result<()> {
        if d == self.k.shape.len() {
            let v = self.vector_value(lanes, self.kept - 1);
            let halves = if lanes == 4 {
                let (lo, hi) = self.promote_halves(v);
                vec![lo, hi]
            } else {
                vec![v]
            };
            for (&acc, h) in accs.iter().zip(halves) {
                let cur = self.b.use_var(acc);
                let sum = self.b.ins().fadd(cur, h);
                self.b.def_var(acc, sum);
            }
            return Ok(());
        }
        let saved: Vec<Value> = self.addr.iter().map(|&v| self.b.use_var(v)).collect();
        let i = self.b.declare_var(types::I64);
        let start = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(i, start);
        let end = self.b.ins().iconst(types::I64, self.k.shape[d] as i64);
        self.counted_loop(d, i, end, 1, &mut |e: &mut Self| e.reduced_loops(d + 1, lanes, accs))?;
        for (j, s) in saved.into_iter().enumerate() {
            self.b.def_var(self.addr[j], s);
        }
        Ok(())
    }

    /// An f32x4 as two f64x2 (lanes 0, 1 and 2, 3), promoted exactly.
    fn promote_halves(&mut self, x: Value) -> (Value, Value) {
        let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
        let lo = self.b.ins().fvpromote_low(x);
        // lanes 2, 3 moved down to 0, 1 (as the second f64-sized half of the register)
        let pairs = self.b.ins().bitcast(types::F64X2, le, x);
        let high = self.b.ins().extractlane(pairs, 1);
        let moved = self.b.ins().scalar_to_vector(types::F64X2, high);
        let moved = self.b.ins().bitcast(types::F32X4, le, moved);
        (lo, self.b.ins().fvpromote_low(moved))
    }

    /// Two f64x2 rounded to one f32x4 (`lo`'s lanes first).
    fn merge_halves(&mut self, lo: Value, hi: Value) -> Value {
        let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
        let (lo, hi) = (self.b.ins().fvdemote(lo), self.b.ins().fvdemote(hi));
        // [lo0, lo1, hi0, hi1]: the low f64-sized halves of both, side by side
        let lo_pairs = self.b.ins().bitcast(types::F64X2, le, lo);
        let hi_pairs = self.b.ins().bitcast(types::F64X2, le, hi);
        let hi_pair = self.b.ins().extractlane(hi_pairs, 0);
        let both = self.b.ins().insertlane(lo_pairs, hi_pair, 1);
        self.b.ins().bitcast(types::F32X4, le, both)
    }

    /// Applies an f64x2 function to vectors of the kernel's float type: f64x2 directly; f32x4 as
    /// two f64x2 halves (promoted exactly, rounded once), so each lane is the scalar path's result.
    fn on_f64_lanes(
        &mut self,
        f: DType,
        args: &[Value],
        op: &mut dyn FnMut(&mut FunctionBuilder, &[Value]) -> Value,
    ) -> Value {
        if f == DType::F64 {
            return op(&mut self.b, args);
        }
        let mut halves = [vec![], vec![]];
        for &x in args {
            let (lo, hi) = self.promote_halves(x);
            halves[0].push(lo);
            halves[1].push(hi);
        }
        let lo = op(&mut self.b, &halves[0]);
        let hi = op(&mut self.b, &halves[1]);
        self.merge_halves(lo, hi)
    }
}
