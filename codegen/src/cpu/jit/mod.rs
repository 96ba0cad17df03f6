//! Cranelift code generation for loop kernels. A kernel becomes one function
//! `fn(views: *const *mut u8)` that receives the base address of each input view and of the output,
//! with every shape, offset and stride baked in as constants (functions are specialized per shape
//! signature). Dims that are contiguous for every view are collapsed first, so an elementwise kernel
//! over same-shaped operands is a single flat loop. Reductions keep an accumulator in a register
//! (f64 for float sums, means and products; i64 for integer ones).

mod simd;

use super::math;
use crate::kernel::{collapse, elem_size, LoopKernel, View};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, InstBuilder, MemFlagsData, Type, UserFuncName, Value};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use kiln_ir::ops::fused::{FusedKernel, ScalarExpr};
use kiln_ir::ops::{BinaryOp, ReduceOp, Scalar, UnaryOp};
use kiln_ir::{DType, Error, Result};

/// `(views, begin, end)`: the kernel covers indices [begin, end) of its outermost dim when that dim
/// is kept (see `CompiledKernel::split_len`); otherwise it ignores the range and covers everything.
pub type KernelFn = unsafe extern "C" fn(*const *mut u8, i64, i64);

/// A compiled kernel: its id, its CLIF, and (when it can be split across cores) the length of the
/// outermost dim that `begin..end` ranges over, with the total element count.
pub struct CompiledKernel {
    pub id: FuncId,
    pub clif: String,
    pub split_len: Option<usize>,
    pub elements: usize,
}

fn jit_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("cranelift: {e}"))
}

/// A JIT module holding the machine code of one specialization's kernels.
pub struct Jit {
    module: Option<JITModule>,
    fctx: FunctionBuilderContext,
}

impl Drop for Jit {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: the functions of this module are only reachable through the plan that owns
            // this `Jit`, which is being dropped.
            unsafe { m.free_memory() };
        }
    }
}

/// The float condition code of a comparison op (false when either side is NaN, except `ne`, which
/// is true then, as in Rust).
fn float_cc(op: BinaryOp) -> FloatCC {
    match op {
        BinaryOp::Eq => FloatCC::Equal,
        BinaryOp::Ne => FloatCC::NotEqual,
        BinaryOp::Lt => FloatCC::LessThan,
        BinaryOp::Le => FloatCC::LessThanOrEqual,
        BinaryOp::Gt => FloatCC::GreaterThan,
        _ => FloatCC::GreaterThanOrEqual,
    }
}

pub fn clif_type(d: DType) -> Type {
    match d {
        DType::F32 => types::F32,
        DType::F64 => types::F64,
        DType::I32 => types::I32,
        DType::I64 => types::I64,
        DType::Bool => types::I8,
    }
}

impl Jit {
    pub fn new() -> Result<Jit> {
        let mut flags = settings::builder();
        flags.set("opt_level", "speed").map_err(jit_err)?;
        flags.set("use_colocated_libcalls", "false").map_err(jit_err)?;
        flags.set("is_pic", "false").map_err(jit_err)?;
        flags.set("enable_verifier", if cfg!(debug_assertions) { "true" } else { "false" }).map_err(jit_err)?;
        let isa = cranelift_native::builder().map_err(jit_err)?.finish(settings::Flags::new(flags)).map_err(jit_err)?;
        let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        Ok(Jit { module: Some(module), fctx: FunctionBuilderContext::new() })
    }

    fn module(&mut self) -> &mut JITModule {
        self.module.as_mut().expect("module lives until drop")
    }

    /// Compiles one kernel, with its CLIF text (headed by the graph nodes it computes).
    pub fn compile(&mut self, k: &LoopKernel) -> Result<CompiledKernel> {
        let k = collapse(k);
        let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
        let split_len = (kept >= 1).then(|| k.shape[0]);
        let elements = k.shape.iter().product();
        let module = self.module.as_mut().expect("module lives until drop");
        let mut sig = module.make_signature();
        for _ in 0..3 {
            sig.params.push(AbiParam::new(types::I64));
        }
        let id = module.declare_function(&k.name, Linkage::Local, &sig).map_err(jit_err)?;
        let mut ctx = module.make_context();
        ctx.func.signature = sig;
        ctx.func.name = UserFuncName::testcase(&k.name);
        {
            let b = FunctionBuilder::new(&mut ctx.func, &mut self.fctx);
            Emitter::new(b, &k)?.emit(module.target_config())?;
        }
        let mut text = String::new();
        for o in &k.origin {
            text.push_str(&format!("; {} computes {o}\n", k.name));
        }
        text.push_str(&ctx.func.display().to_string());
        let module = self.module();
        module.define_function(id, &mut ctx).map_err(jit_err)?;
        module.clear_context(&mut ctx);
        Ok(CompiledKernel { id, clif: text, split_len, elements })
    }

    pub fn finalize(&mut self) -> Result<()> {
        self.module().finalize_definitions().map_err(jit_err)
    }

    pub fn function(&mut self, id: FuncId) -> KernelFn {
        let ptr = self.module().get_finalized_function(id);
        // SAFETY: every kernel is declared with the signature `fn(i64, i64, i64)` (the table of view
        // addresses and a range) and returns nothing.
        unsafe { std::mem::transmute::<*const u8, KernelFn>(ptr) }
    }
}

/// How the math module emits a function for a kernel of float type `d` (see `math::MathMode`).
fn math_mode(vector: bool, d: DType) -> math::MathMode {
    math::MathMode { vector, f32_result: d == DType::F32, fma: math::MathMode::host_fma() }
}

struct Emitter<'a> {
    b: FunctionBuilder<'a>,
    k: &'a LoopKernel,
    dtypes: Vec<DType>,
    /// Address of each input view, then of the output.
    addr: Vec<Variable>,
    kept: usize,
    acc: Option<Variable>,
    /// Vector accumulators of a reduction whose innermost reduced dim runs in SIMD, folded into
    /// `acc` before the result is stored.
    vector_accs: Vec<Variable>,
    best_idx: Option<Variable>,
    counter: Option<Variable>,
    /// [begin, end) of the outermost dim, when it is kept (the kernel can be split by it).
    range: Option<(Value, Value)>,
}

impl<'a> Emitter<'a> {
    fn new(b: FunctionBuilder<'a>, k: &'a LoopKernel) -> Result<Self> {
        let fk = FusedKernel { exprs: k.exprs.clone(), n_inputs: k.inputs.len(), reduce: None };
        let dtypes = fk.dtypes(&k.input_dtypes).map_err(Error::Invalid)?;
        let kept = k.shape.len() - k.reduce.map_or(0, |r| r.1);
        Ok(Emitter {
            b,
            k,
            dtypes,
            addr: vec![],
            kept,
            acc: None,
            vector_accs: vec![],
            best_idx: None,
            counter: None,
            range: None,
        })
    }

    fn result_dtype(&self) -> DType {
        *self.dtypes.last().expect("non-empty kernel")
    }

    fn views(&self) -> Vec<(&'a View, DType)> {
        let mut v: Vec<(&View, DType)> = self.k.inputs.iter().zip(self.k.input_dtypes.iter().copied()).collect();
        v.push((&self.k.out, self.k.out_dtype));
        v
    }

    fn emit(mut self, config: cranelift_codegen::isa::TargetFrontendConfig) -> Result<()> {
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let params = self.b.block_params(entry).to_vec();
        let table = params[0];
        if self.kept >= 1 {
            self.range = Some((params[1], params[2]));
        }
        for (i, (v, d)) in self.views().into_iter().enumerate() {
            let base = self.b.ins().load(types::I64, MemFlagsData::trusted(), table, (8 * i) as i32);
            let mut a = base;
            if v.offset != 0 {
                a = self.b.ins().iadd_imm_s(a, v.offset as i64 * elem_size(d));
            }
            if let Some((begin, _)) = self.range {
                if v.strides[0] != 0 {
                    // start at index `begin` of the outermost dim
                    let step = self.b.ins().imul_imm_s(begin, v.strides[0] as i64 * elem_size(d));
                    a = self.b.ins().iadd(a, step);
                }
            }
            let var = self.b.declare_var(types::I64);
            self.b.def_var(var, a);
            self.addr.push(var);
        }
        self.level(0)?;
        self.b.ins().return_(&[]);
        self.b.seal_all_blocks();
        self.b.finalize(config);
        Ok(())
    }

    fn acc_type(&self) -> (Type, DType) {
        let (op, _) = self.k.reduce.expect("reduction");
        let d = self.result_dtype();
        match (op, d) {
            (ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax, _) => (clif_type(d), d),
            (_, DType::F32 | DType::F64) => (types::F64, DType::F64),
            _ => (types::I64, DType::I64),
        }
    }

    fn level(&mut self, d: usize) -> Result<()> {
        let reducing = self.k.reduce.is_some() && d == self.kept;
        if reducing {
            let (op, _) = self.k.reduce.expect("reduction");
            let (ty, ad) = self.acc_type();
            let init = match op {
                ReduceOp::Sum | ReduceOp::Mean => 0.0,
                ReduceOp::Prod => 1.0,
                ReduceOp::Max | ReduceOp::ArgMax => f64::NEG_INFINITY,
                ReduceOp::Min => f64::INFINITY,
            };
            let v = self.constant(Scalar::from_f64(ad, init), ad, init);
            let acc = self.b.declare_var(ty);
            self.b.def_var(acc, v);
            self.acc = Some(acc);
            if op == ReduceOp::ArgMax {
                let (best, cnt) = (self.b.declare_var(types::I64), self.b.declare_var(types::I64));
                let zero = self.b.ins().iconst(types::I64, 0);
                self.b.def_var(best, zero);
                self.b.def_var(cnt, zero);
                self.best_idx = Some(best);
                self.counter = Some(cnt);
            }
        }
        if reducing {
            self.init_vector_accs();
        }
        self.loops(d)?;
        if reducing {
            self.fold_vector_accs();
            self.store_reduction();
        }
        Ok(())
    }

    /// A constant of dtype `d`; integer extremes stand for the infinities.
    fn constant(&mut self, s: Scalar, d: DType, as_f64: f64) -> Value {
        match d {
            DType::F32 => self.b.ins().f32const(as_f64 as f32),
            DType::F64 => self.b.ins().f64const(as_f64),
            DType::Bool => self.b.ins().iconst(types::I8, (as_f64 != 0.0) as i64),
            DType::I32 | DType::I64 => {
                let v = if as_f64 == f64::INFINITY {
                    if d == DType::I32 {
                        i32::MAX as i64
                    } else {
                        i64::MAX
                    }
                } else if as_f64 == f64::NEG_INFINITY {
                    if d == DType::I32 {
                        i32::MIN as i64
                    } else {
                        i64::MIN
                    }
                } else {
                    match s {
                        Scalar::I32(x) => x as i64,
                        Scalar::I64(x) => x,
                        _ => as_f64 as i64,
                    }
                };
                self.b.ins().iconst(clif_type(d), v)
            }
        }
    }

    /// The loop over dim `d` (its range, for the outermost dim of a split kernel), then the levels
    /// inside it; the innermost dim runs in SIMD when the kernel allows.
    fn loops(&mut self, d: usize) -> Result<()> {
        if d == self.k.shape.len() {
            return self.body();
        }
        let saved: Vec<Value> = self.addr.iter().map(|&v| self.b.use_var(v)).collect();
        let (start, end) = match (d, self.range) {
            (0, Some(range)) => range,
            _ => (self.b.ins().iconst(types::I64, 0), self.b.ins().iconst(types::I64, self.k.shape[d] as i64)),
        };
        let i = self.b.declare_var(types::I64);
        self.b.def_var(i, start);
        let innermost = d + 1 == self.k.shape.len();
        let simd = if innermost { self.simd_lanes() } else { None };
        if innermost && !self.vector_accs.is_empty() {
            let lanes = self.inner_reduction_lanes().expect("vector accumulators only with lanes");
            // whole vectors into the vector accumulators, then the tail into the scalar one
            self.counted_loop(d, i, end, lanes, &mut |e: &mut Self| {
                e.inner_reduction_simd(lanes);
                Ok(())
            })?;
            self.counted_loop(d, i, end, 1, &mut |e: &mut Self| e.body())?;
            for (j, s) in saved.into_iter().enumerate() {
                self.b.def_var(self.addr[j], s);
            }
            return Ok(());
        }
        let outer_reduction = if self.kept >= 1 && d + 1 == self.kept { self.outer_reduction_lanes() } else { None };
        if let Some(lanes) = outer_reduction {
            // `lanes` outputs at a time (each with its reduction loops inside), then one by one
            self.counted_loop(d, i, end, lanes, &mut |e: &mut Self| e.outer_reduction_simd(d, lanes))?;
            self.counted_loop(d, i, end, 1, &mut |e: &mut Self| e.level(d + 1))?;
        } else if let Some(lanes) = simd {
            // whole vectors, then the scalar tail, on one counter
            self.counted_loop(d, i, end, lanes, &mut |e: &mut Self| e.body_simd(lanes))?;
            self.counted_loop(d, i, end, 1, &mut |e: &mut Self| e.body())?;
        } else {
            self.counted_loop(d, i, end, 1, &mut |e: &mut Self| e.level(d + 1))?;
        }
        for (j, s) in saved.into_iter().enumerate() {
            self.b.def_var(self.addr[j], s);
        }
        Ok(())
    }

    /// `while i + width <= end { body; advance every view `width` steps along dim `d`; i += width }`
    /// (the output does not move along reduced dims).
    fn counted_loop(
        &mut self,
        d: usize,
        i: Variable,
        end: Value,
        width: usize,
        body: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        let views = self.views();
        let (header, block, exit) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let iv = self.b.use_var(i);
        let more = if width == 1 {
            self.b.ins().icmp(IntCC::SignedLessThan, iv, end)
        } else {
            let next = self.b.ins().iadd_imm_s(iv, width as i64);
            self.b.ins().icmp(IntCC::SignedLessThanOrEqual, next, end)
        };
        self.b.ins().brif(more, block, &[], exit, &[]);
        self.b.switch_to_block(block);
        body(self)?;
        for (j, (v, dt)) in views.iter().enumerate() {
            if j == views.len() - 1 && d >= self.kept {
                continue;
            }
            let step = v.strides[d] as i64 * elem_size(*dt) * width as i64;
            if step != 0 {
                let a = self.b.use_var(self.addr[j]);
                let a = self.b.ins().iadd_imm_s(a, step);
                self.b.def_var(self.addr[j], a);
            }
        }
        let iv = self.b.use_var(i);
        let next = self.b.ins().iadd_imm_s(iv, width as i64);
        self.b.def_var(i, next);
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(exit);
        Ok(())
    }

    fn body(&mut self) -> Result<()> {
        let mut regs: Vec<Value> = Vec::with_capacity(self.k.exprs.len());
        for e in &self.k.exprs {
            let v = match *e {
                ScalarExpr::Input(j) => {
                    let a = self.b.use_var(self.addr[j]);
                    self.b.ins().load(clif_type(self.k.input_dtypes[j]), MemFlagsData::trusted(), a, 0)
                }
                ScalarExpr::Const(c) => self.constant(c, c.dtype(), c.as_f64()),
                ScalarExpr::Unary(op, a) => self.unary(op, regs[a], self.dtypes[a]),
                ScalarExpr::Binary(op, a, b) => self.binary(op, regs[a], regs[b], self.dtypes[a]),
                ScalarExpr::Where(c, a, b) => self.b.ins().select(regs[c], regs[a], regs[b]),
            };
            regs.push(v);
        }
        let r = *regs.last().expect("non-empty kernel");
        match self.k.reduce {
            None => {
                let out = self.addr[self.addr.len() - 1];
                let a = self.b.use_var(out);
                let r = self.cast(r, self.result_dtype(), self.k.out_dtype);
                self.b.ins().store(MemFlagsData::trusted(), r, a, 0);
            }
            Some((op, _)) => self.combine(op, r),
        }
        Ok(())
    }

    fn combine(&mut self, op: ReduceOp, v: Value) {
        let acc = self.acc.expect("accumulator");
        let (_, ad) = self.acc_type();
        let d = self.result_dtype();
        let cur = self.b.use_var(acc);
        let float = ad.is_float();
        let new = match op {
            ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Prod => {
                let v = self.cast(v, d, ad);
                match (op, float) {
                    (ReduceOp::Prod, true) => self.b.ins().fmul(cur, v),
                    (ReduceOp::Prod, false) => self.b.ins().imul(cur, v),
                    (_, true) => self.b.ins().fadd(cur, v),
                    (_, false) => self.b.ins().iadd(cur, v),
                }
            }
            ReduceOp::Max if float => self.b.ins().fmax(cur, v),
            ReduceOp::Max => self.b.ins().smax(cur, v),
            ReduceOp::Min if float => self.b.ins().fmin(cur, v),
            ReduceOp::Min => self.b.ins().smin(cur, v),
            ReduceOp::ArgMax => {
                // First maximum wins; a NaN beats any number (numpy's rule).
                let (best, cnt) = (self.best_idx.expect("argmax"), self.counter.expect("argmax"));
                let better = if float {
                    let gt = self.b.ins().fcmp(FloatCC::GreaterThan, v, cur);
                    let v_nan = self.b.ins().fcmp(FloatCC::Unordered, v, v);
                    let cur_num = self.b.ins().fcmp(FloatCC::Ordered, cur, cur);
                    let nan_first = self.b.ins().band(v_nan, cur_num);
                    self.b.ins().bor(gt, nan_first)
                } else {
                    self.b.ins().icmp(IntCC::SignedGreaterThan, v, cur)
                };
                let i = self.b.use_var(cnt);
                let bi = self.b.use_var(best);
                let nbi = self.b.ins().select(better, i, bi);
                self.b.def_var(best, nbi);
                let i1 = self.b.ins().iadd_imm_s(i, 1);
                self.b.def_var(cnt, i1);
                self.b.ins().select(better, v, cur)
            }
        };
        self.b.def_var(acc, new);
    }

    fn store_reduction(&mut self) {
        let (op, _) = self.k.reduce.expect("reduction");
        let (_, ad) = self.acc_type();
        let acc = self.b.use_var(self.acc.expect("accumulator"));
        let value = match op {
            ReduceOp::ArgMax => self.b.use_var(self.best_idx.expect("argmax")),
            ReduceOp::Mean => {
                let count: usize = self.k.shape[self.kept..].iter().product();
                let c = self.b.ins().f64const(count as f64);
                let m = self.b.ins().fdiv(acc, c);
                self.cast(m, DType::F64, self.k.out_dtype)
            }
            _ => self.cast(acc, ad, self.k.out_dtype),
        };
        let out = self.addr[self.addr.len() - 1];
        let a = self.b.use_var(out);
        self.b.ins().store(MemFlagsData::trusted(), value, a, 0);
    }

    /// Converts between dtypes with Rust's `as` semantics (saturating, NaN to 0; nonzero is true).
    fn cast(&mut self, x: Value, from: DType, to: DType) -> Value {
        use DType::*;
        let ins = self.b.ins();
        match (from, to) {
            _ if from == to => x,
            (F32, F64) => ins.fpromote(types::F64, x),
            (F64, F32) => ins.fdemote(types::F32, x),
            (F32 | F64, I32 | I64) => ins.fcvt_to_sint_sat(clif_type(to), x),
            (I32 | I64, F32 | F64) => ins.fcvt_from_sint(clif_type(to), x),
            (Bool, F32 | F64) => ins.fcvt_from_uint(clif_type(to), x),
            (Bool, I32 | I64) => ins.uextend(clif_type(to), x),
            (I64, I32) => ins.ireduce(types::I32, x),
            (I32, I64) => ins.sextend(types::I64, x),
            (F32, Bool) => {
                let z = ins.f32const(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, x, z)
            }
            (F64, Bool) => {
                let z = ins.f64const(0.0);
                self.b.ins().fcmp(FloatCC::NotEqual, x, z)
            }
            (I32 | I64, Bool) => ins.icmp_imm_s(IntCC::NotEqual, x, 0),
            _ => unreachable!("all dtype pairs are covered"),
        }
    }

    fn fconst(&mut self, d: DType, v: f64) -> Value {
        if d == DType::F32 {
            self.b.ins().f32const(v as f32)
        } else {
            self.b.ins().f64const(v)
        }
    }

    /// Applies an f64 math function, promoting and rounding f32 once.
    fn via_f64(&mut self, x: Value, d: DType, f: impl FnOnce(&mut FunctionBuilder, Value) -> Value) -> Value {
        let x = if d == DType::F32 { self.b.ins().fpromote(types::F64, x) } else { x };
        let r = f(&mut self.b, x);
        if d == DType::F32 {
            self.b.ins().fdemote(types::F32, r)
        } else {
            r
        }
    }

    fn unary(&mut self, op: UnaryOp, x: Value, d: DType) -> Value {
        use UnaryOp::*;
        if let Cast(to) = op {
            return self.cast(x, d, to);
        }
        if op == Not {
            return self.b.ins().bxor_imm_s(x, 1);
        }
        if d.is_int() {
            let ty = clif_type(d);
            return match op {
                Neg => self.b.ins().ineg(x),
                Abs => self.b.ins().iabs(x),
                Relu => {
                    let z = self.b.ins().iconst(ty, 0);
                    self.b.ins().smax(x, z)
                }
                Sign => {
                    let (z, one, m1) =
                        (self.b.ins().iconst(ty, 0), self.b.ins().iconst(ty, 1), self.b.ins().iconst(ty, -1));
                    let pos = self.b.ins().icmp(IntCC::SignedGreaterThan, x, z);
                    let neg = self.b.ins().icmp(IntCC::SignedLessThan, x, z);
                    let t = self.b.ins().select(neg, m1, z);
                    self.b.ins().select(pos, one, t)
                }
                _ => unreachable!("type rule admits only neg/abs/sign/relu on ints"),
            };
        }
        match op {
            Neg => self.b.ins().fneg(x),
            Abs => self.b.ins().fabs(x),
            Sqrt => self.b.ins().sqrt(x),
            Floor => self.b.ins().floor(x),
            Ceil => self.b.ins().ceil(x),
            Reciprocal => {
                let one = self.fconst(d, 1.0);
                self.b.ins().fdiv(one, x)
            }
            Rsqrt => {
                let one = self.fconst(d, 1.0);
                let s = self.b.ins().sqrt(x);
                self.b.ins().fdiv(one, s)
            }
            Relu => {
                let z = self.fconst(d, 0.0);
                let neg = self.b.ins().fcmp(FloatCC::LessThan, x, z);
                self.b.ins().select(neg, z, x)
            }
            Sign => {
                let (z, one, m1) = (self.fconst(d, 0.0), self.fconst(d, 1.0), self.fconst(d, -1.0));
                let pos = self.b.ins().fcmp(FloatCC::GreaterThan, x, z);
                let neg = self.b.ins().fcmp(FloatCC::LessThan, x, z);
                let t = self.b.ins().select(neg, m1, x);
                self.b.ins().select(pos, one, t)
            }
            Exp | Log | Log1p | Expm1 | Tanh | Sigmoid | Softplus | Sin | Cos => {
                let mode = math_mode(false, d);
                if d == DType::F32 && math::computes_in_f32(op) {
                    math::unary(&mut self.b, op, x, mode)
                } else {
                    self.via_f64(x, d, |b, v| math::unary(b, op, v, mode))
                }
            }
            Not | Cast(_) => unreachable!("handled above"),
        }
    }

    fn binary(&mut self, op: BinaryOp, a: Value, b: Value, d: DType) -> Value {
        use BinaryOp::*;
        let float = d.is_float();
        if op.is_comparison() {
            return if float {
                self.b.ins().fcmp(float_cc(op), a, b)
            } else {
                // bool compares as unsigned (false < true)
                let signed = d != DType::Bool;
                let cc = match (op, signed) {
                    (Eq, _) => IntCC::Equal,
                    (Ne, _) => IntCC::NotEqual,
                    (Lt, true) => IntCC::SignedLessThan,
                    (Le, true) => IntCC::SignedLessThanOrEqual,
                    (Gt, true) => IntCC::SignedGreaterThan,
                    (_, true) => IntCC::SignedGreaterThanOrEqual,
                    (Lt, false) => IntCC::UnsignedLessThan,
                    (Le, false) => IntCC::UnsignedLessThanOrEqual,
                    (Gt, false) => IntCC::UnsignedGreaterThan,
                    (_, false) => IntCC::UnsignedGreaterThanOrEqual,
                };
                self.b.ins().icmp(cc, a, b)
            };
        }
        match (op, float) {
            (And, _) => self.b.ins().band(a, b),
            (Or, _) => self.b.ins().bor(a, b),
            (Add, true) => self.b.ins().fadd(a, b),
            (Sub, true) => self.b.ins().fsub(a, b),
            (Mul, true) => self.b.ins().fmul(a, b),
            (Div, true) => self.b.ins().fdiv(a, b),
            (Maximum, true) => self.b.ins().fmax(a, b),
            (Minimum, true) => self.b.ins().fmin(a, b),
            (Pow, true) => {
                let (pa, pb) = if d == DType::F32 {
                    (self.b.ins().fpromote(types::F64, a), self.b.ins().fpromote(types::F64, b))
                } else {
                    (a, b)
                };
                let r = math::pow(&mut self.b, pa, pb, math_mode(false, d));
                if d == DType::F32 {
                    self.b.ins().fdemote(types::F32, r)
                } else {
                    r
                }
            }
            (Add, false) => self.b.ins().iadd(a, b),
            (Sub, false) => self.b.ins().isub(a, b),
            (Mul, false) => self.b.ins().imul(a, b),
            (Maximum, false) => self.b.ins().smax(a, b),
            (Minimum, false) => self.b.ins().smin(a, b),
            _ => unreachable!("type rule: {op:?} on {d}"),
        }
    }
}
