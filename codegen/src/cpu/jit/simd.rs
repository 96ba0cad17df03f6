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
                    Binary(op, a, _) => op != &BinaryOp::Pow && !(op.is_comparison() && self.dtypes[*a] == DType::Bool),
                }
        });
        (contiguous && ops_ok && self.result_dtype() == f && self.k.shape[r - 1] >= lanes).then_some(lanes)
    }

    /// One vector of results: contiguous operands are loaded as vectors, broadcast ones splatted;
    /// booleans are lane masks.
    pub(super) fn body_simd(&mut self, lanes: usize) -> Result<()> {
        use ScalarExpr::*;
        let f = self.k.out_dtype;
        let (vt, mt) = if lanes == 4 { (types::F32X4, types::I32X4) } else { (types::F64X2, types::I64X2) };
        let r = self.k.shape.len();
        let mut regs: Vec<Value> = Vec::with_capacity(self.k.exprs.len());
        for (idx, e) in self.k.exprs.iter().enumerate() {
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
            let _ = (idx, mt);
            regs.push(v);
        }
        let out = self.addr[self.addr.len() - 1];
        let a = self.b.use_var(out);
        let r = *regs.last().expect("non-empty kernel");
        self.b.ins().store(MemFlagsData::new().with_notrap(), r, a, 0);
        Ok(())
    }
}
