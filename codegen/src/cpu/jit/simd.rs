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
        use ScalarExpr::*;
        let r = self.k.shape.len();
        if self.k.reduce.is_some() || r == 0 {
            return None;
        }
        let f = self.k.out_dtype;
        let lanes = match f {
            DType::F32 => 4,
            DType::F64 => 2,
            _ => return None,
        };
        let contiguous = self.k.out.strides[r - 1] == 1
            && self.k.inputs.iter().all(|v| matches!(v.strides[r - 1], 0 | 1))
            && self.k.input_dtypes.iter().all(|&d| d == f);
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
        (contiguous && ops_ok && self.result_dtype() == f && self.k.shape[r - 1] >= lanes).then_some(lanes)
    }

    /// One vector of results: contiguous operands are loaded as vectors, broadcast ones splatted;
    /// booleans are lane masks.
    pub(super) fn body_simd(&mut self, lanes: usize) -> Result<()> {
        use ScalarExpr::*;
        let f = self.k.out_dtype;
        let vt = if lanes == 4 { types::F32X4 } else { types::F64X2 };
        let r = self.k.shape.len();
        let mut regs: Vec<Value> = Vec::with_capacity(self.k.exprs.len());
        for e in &self.k.exprs {
            let as_float = |b: &mut FunctionBuilder, m: Value| {
                b.ins().bitcast(vt, MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little), m)
            };
            let v = match *e {
                Input(j) => {
                    let a = self.b.use_var(self.addr[j]);
                    if self.k.inputs[j].strides[r - 1] == 1 {
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
        let out = self.addr[self.addr.len() - 1];
        let a = self.b.use_var(out);
        let r = *regs.last().expect("non-empty kernel");
        self.b.ins().store(MemFlagsData::new().with_notrap(), r, a, 0);
        Ok(())
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
        let le = MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little);
        let mut halves = [vec![], vec![]];
        for &x in args {
            halves[0].push(self.b.ins().fvpromote_low(x));
            // lanes 2, 3 moved down to 0, 1 (as the second f64-sized half of the register)
            let pairs = self.b.ins().bitcast(types::F64X2, le, x);
            let high = self.b.ins().extractlane(pairs, 1);
            let moved = self.b.ins().scalar_to_vector(types::F64X2, high);
            let moved = self.b.ins().bitcast(types::F32X4, le, moved);
            halves[1].push(self.b.ins().fvpromote_low(moved));
        }
        let lo = op(&mut self.b, &halves[0]);
        let hi = op(&mut self.b, &halves[1]);
        let (lo, hi) = (self.b.ins().fvdemote(lo), self.b.ins().fvdemote(hi));
        // [lo0, lo1, hi0, hi1]: the low f64-sized halves of both, side by side
        let lo_pairs = self.b.ins().bitcast(types::F64X2, le, lo);
        let hi_pairs = self.b.ins().bitcast(types::F64X2, le, hi);
        let hi_pair = self.b.ins().extractlane(hi_pairs, 0);
        let both = self.b.ins().insertlane(lo_pairs, hi_pair, 1);
        self.b.ins().bitcast(types::F32X4, le, both)
    }
}
