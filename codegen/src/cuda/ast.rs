//! A typed AST of the CUDA C that kiln emits: types, expressions, statements, device functions and
//! kernels. The emitter builds these values and `print` turns them into text, so no code is built by
//! pasting strings and every literal is printed one way (floats exactly, with their suffix).

use kiln_ir::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CType {
    Float,
    Double,
    Int,
    LongLong,
    UInt,
    ULongLong,
    Bool,
    Void,
    /// Four floats, loaded or stored as one 16-byte access.
    Float4,
    /// Two words, loaded or stored as one 8-byte access (a float's TF32 high and low parts).
    UInt2,
    /// Four words, loaded or stored as one 16-byte access (a tensor-core fragment's high parts).
    UInt4,
    /// `float*` and `const float*` (a helper's or a slab's pointer into memory).
    FloatPtr,
    ConstFloatPtr,
}

impl CType {
    pub fn of(d: DType) -> CType {
        match d {
            DType::F32 => CType::Float,
            DType::F64 => CType::Double,
            DType::I32 => CType::Int,
            DType::I64 => CType::LongLong,
            DType::Bool => CType::Bool,
        }
    }
    /// Bytes of a value (as CUDA lays it out).
    pub fn size(self) -> usize {
        match self {
            CType::Bool => 1,
            CType::Float | CType::Int | CType::UInt => 4,
            CType::Double | CType::LongLong | CType::ULongLong => 8,
            CType::Float4 | CType::UInt4 => 16,
            CType::UInt2 | CType::FloatPtr | CType::ConstFloatPtr => 8,
            CType::Void => 0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            CType::Float => "float",
            CType::Double => "double",
            CType::Int => "int",
            CType::LongLong => "long long",
            CType::UInt => "unsigned int",
            CType::ULongLong => "unsigned long long",
            CType::Bool => "bool",
            CType::Void => "void",
            CType::Float4 => "float4",
            CType::UInt2 => "uint2",
            CType::UInt4 => "uint4",
            CType::FloatPtr => "float*",
            CType::ConstFloatPtr => "const float*",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    BitAnd,
    BitXor,
    Shl,
    Shr,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        use BinOp::*;
        match self {
            Add => "+",
            Sub => "-",
            Mul => "*",
            Div => "/",
            Rem => "%",
            Lt => "<",
            Le => "<=",
            Gt => ">",
            Ge => ">=",
            Eq => "==",
            Ne => "!=",
            And => "&&",
            Or => "||",
            BitAnd => "&",
            BitXor => "^",
            Shl => "<<",
            Shr => ">>",
        }
    }
    /// C precedence (higher binds tighter).
    pub fn precedence(self) -> u8 {
        use BinOp::*;
        match self {
            Mul | Div | Rem => 10,
            Add | Sub => 9,
            Shl | Shr => 8,
            Lt | Le | Gt | Ge => 7,
            Eq | Ne => 6,
            BitAnd => 5,
            BitXor => 4,
            And => 2,
            Or => 1,
        }
    }
}

/// The CUDA built-in index variables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    ThreadIdx,
    BlockIdx,
    BlockDim,
    GridDim,
    ThreadIdxY,
    BlockIdxY,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Var(String),
    F32(f32),
    F64(f64),
    Int(i64),
    /// An `unsigned int` literal (bit masks).
    UInt(u32),
    ULong(u64),
    Bool(bool),
    Builtin(Builtin),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// A call of a CUDA math function, an intrinsic or one of the prelude's device functions.
    Call(&'static str, Vec<Expr>),
    Cast(CType, Box<Expr>),
    /// `base[index]`.
    Index(Box<Expr>, Box<Expr>),
    /// `reinterpret_cast<const float4*>(base)[index]`: a 16-byte access.
    Vec4(Box<Expr>, Box<Expr>),
    /// `v.x`, `v.y`, ...
    Lane(Box<Expr>, u8),
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
}

pub fn var(name: impl Into<String>) -> Expr {
    Expr::Var(name.into())
}
pub fn int(v: i64) -> Expr {
    Expr::Int(v)
}
pub fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}
pub fn call(f: &'static str, args: Vec<Expr>) -> Expr {
    Expr::Call(f, args)
}
pub fn cast(t: CType, e: Expr) -> Expr {
    Expr::Cast(t, Box::new(e))
}
pub fn index(base: Expr, i: Expr) -> Expr {
    Expr::Index(Box::new(base), Box::new(i))
}
pub fn select(c: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(b))
}

impl std::ops::Add for Expr {
    type Output = Expr;
    fn add(self, o: Expr) -> Expr {
        bin(BinOp::Add, self, o)
    }
}
impl std::ops::Sub for Expr {
    type Output = Expr;
    fn sub(self, o: Expr) -> Expr {
        bin(BinOp::Sub, self, o)
    }
}
impl std::ops::Mul for Expr {
    type Output = Expr;
    fn mul(self, o: Expr) -> Expr {
        bin(BinOp::Mul, self, o)
    }
}
impl std::ops::Div for Expr {
    type Output = Expr;
    fn div(self, o: Expr) -> Expr {
        bin(BinOp::Div, self, o)
    }
}
impl std::ops::Rem for Expr {
    type Output = Expr;
    fn rem(self, o: Expr) -> Expr {
        bin(BinOp::Rem, self, o)
    }
}
impl std::ops::BitAnd for Expr {
    type Output = Expr;
    fn bitand(self, o: Expr) -> Expr {
        bin(BinOp::BitAnd, self, o)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Comment(String),
    /// `[const] type name [= init];`
    Decl {
        ty: CType,
        name: String,
        init: Option<Expr>,
        constant: bool,
    },
    /// `__shared__ type name[len];` (`alignas(align)` first where `align` is not 0: an array read
    /// as `float4`s).
    SharedArray {
        ty: CType,
        name: String,
        len: usize,
        align: usize,
    },
    /// `__shared__ union { struct { arrays } s0; ... } name;`: the `SharedArray`s of the sections
    /// of a side-by-side kernel (`side.rs`), which overlap since a block runs one section; section
    /// code names its arrays `name.sN.array`. With `dynamic`, the kernel's shared arrays past the
    /// 48 KiB a kernel may declare statically, in the dynamic shared memory it is launched with
    /// (`dynamic_shared.rs`): the union (or, for one member named "", a struct whose arrays code
    /// names `name.array`) is a type of its own laid over that memory.
    SharedUnion {
        name: String,
        members: Vec<(String, Vec<Stmt>)>,
        dynamic: Option<DynamicShared>,
    },
    Assign(Expr, Expr),
    /// `lhs op= rhs;`
    Compound(BinOp, Expr, Expr),
    If(Expr, Vec<Stmt>, Vec<Stmt>),
    /// `for (type var = init; var < end; var += step)`
    For {
        ty: CType,
        var: String,
        init: Expr,
        end: Expr,
        step: Expr,
        body: Vec<Stmt>,
    },
    Return,
    /// `break;`: leaves the innermost loop (a loop's turns taken in passes, `tiled.rs`).
    Break,
    ReturnValue(Expr),
    SyncThreads,
    /// `#pragma text` (at the margin), for the loop that follows: `unroll`.
    Pragma(&'static str),
    /// An expression evaluated for its effect (`__threadfence();`).
    Call(Expr),
    Block(Vec<Stmt>),
    /// Inline PTX for the GPU (`asm volatile`, outputs read and written: `"+f"`), and in its
    /// place the emulator's C++ call: printed between `#ifdef __CUDA_ARCH__`, `#else` and `#endif`,
    /// so NVRTC and the emulator compile the same text. Only in the prelude's helpers.
    Asm {
        ptx: &'static str,
        outputs: Vec<(&'static str, Expr)>,
        inputs: Vec<(&'static str, Expr)>,
        /// Whether it orders memory accesses, so the compiler may not move any across it (a
        /// `"memory"` clobber).
        memory: bool,
        emulated: Expr,
    },
}

pub fn decl(ty: CType, name: impl Into<String>, init: Expr) -> Stmt {
    Stmt::Decl { ty, name: name.into(), init: Some(init), constant: true }
}
pub fn decl_mut(ty: CType, name: impl Into<String>, init: Expr) -> Stmt {
    Stmt::Decl { ty, name: name.into(), init: Some(init), constant: false }
}
pub fn assign(lhs: Expr, rhs: Expr) -> Stmt {
    Stmt::Assign(lhs, rhs)
}

/// `for (int name = 0; name < end; name += step) body`: a loop of constant trip count.
pub fn counted_loop(name: &str, end: i64, step: i64, body: Vec<Stmt>) -> Stmt {
    Stmt::For { ty: CType::Int, var: name.into(), init: int(0), end: int(end), step: int(step), body }
}

/// `counted_loop`, headed by `#pragma unroll` where `unroll`: for the loops NVRTC would not
/// unroll whole on its own (the pragma also changes ptxas's schedule, so it goes only where asked).
pub fn unrolled_loop(name: &str, end: i64, step: i64, body: Vec<Stmt>, unroll: bool) -> Vec<Stmt> {
    let pragma = unroll.then_some(Stmt::Pragma("unroll"));
    pragma.into_iter().chain([counted_loop(name, end, step, body)]).collect()
}

impl Expr {
    /// Whether evaluating this expression reads memory (an element of an array or a pointer).
    pub fn reads_memory(&self) -> bool {
        match self {
            Expr::Index(..) | Expr::Vec4(..) => true,
            Expr::Call(_, args) => args.iter().any(Expr::reads_memory),
            Expr::Neg(a) | Expr::Not(a) | Expr::Cast(_, a) | Expr::Lane(a, _) => a.reads_memory(),
            Expr::Binary(_, a, b) => a.reads_memory() || b.reads_memory(),
            Expr::Select(c, a, b) => c.reads_memory() || a.reads_memory() || b.reads_memory(),
            _ => false,
        }
    }

    /// Whether this expression calls a function whose name satisfies `f`.
    pub fn calls(&self, f: &dyn Fn(&str) -> bool) -> bool {
        match self {
            Expr::Call(name, args) => f(name) || args.iter().any(|a| a.calls(f)),
            Expr::Neg(a) | Expr::Not(a) | Expr::Cast(_, a) | Expr::Lane(a, _) => a.calls(f),
            Expr::Binary(_, a, b) | Expr::Index(a, b) | Expr::Vec4(a, b) => a.calls(f) || b.calls(f),
            Expr::Select(c, a, b) => c.calls(f) || a.calls(f) || b.calls(f),
            _ => false,
        }
    }
}

/// Whether a statement of `body` (or one nested in it) calls a function whose name satisfies `f`.
pub fn calls(body: &[Stmt], f: &dyn Fn(&str) -> bool) -> bool {
    body.iter().any(|s| match s {
        Stmt::Decl { init, .. } => init.as_ref().is_some_and(|e| e.calls(f)),
        Stmt::Assign(a, b) | Stmt::Compound(_, a, b) => a.calls(f) || b.calls(f),
        Stmt::If(c, a, b) => c.calls(f) || calls(a, f) || calls(b, f),
        Stmt::For { init, end, step, body, .. } => init.calls(f) || end.calls(f) || step.calls(f) || calls(body, f),
        Stmt::ReturnValue(e) | Stmt::Call(e) => e.calls(f),
        Stmt::Block(b) => calls(b, f),
        Stmt::Asm { outputs, inputs, emulated, .. } => {
            outputs.iter().chain(inputs).any(|(_, e)| e.calls(f)) || emulated.calls(f)
        }
        Stmt::Comment(_)
        | Stmt::SharedArray { .. }
        | Stmt::SharedUnion { .. }
        | Stmt::Return
        | Stmt::Break
        | Stmt::SyncThreads
        | Stmt::Pragma(_) => false,
    })
}

/// Whether a statement of `body` (or one nested in it) is a block barrier.
pub fn syncs(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::SyncThreads => true,
        Stmt::If(_, a, b) => syncs(a) || syncs(b),
        Stmt::For { body, .. } | Stmt::Block(body) => syncs(body),
        _ => false,
    })
}

#[derive(Clone, Debug, PartialEq)]
pub enum ParamKind {
    /// `const T* __restrict__`
    In,
    /// `T* __restrict__`
    Out,
    /// Read and written (an in-place update): `T*`.
    InOut,
    /// Read through a pointer that the kernel also writes through: `const T*`, no `__restrict__`.
    InAliased,
    Value,
}

impl ParamKind {
    /// The same access without `__restrict__` (for a pointer that another pointer of the kernel
    /// may alias).
    pub fn without_restrict(&self) -> ParamKind {
        match self {
            ParamKind::In | ParamKind::InAliased => ParamKind::InAliased,
            ParamKind::Out | ParamKind::InOut => ParamKind::InOut,
            ParamKind::Value => ParamKind::Value,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub ty: CType,
    pub name: String,
    pub kind: ParamKind,
}

/// A `__device__` helper of the prelude.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceFn {
    pub ret: CType,
    pub name: &'static str,
    pub params: Vec<(CType, &'static str)>,
    /// The first this many params are references the helper writes (`float& d0`).
    pub outputs: usize,
    pub body: Vec<Stmt>,
}

impl DeviceFn {
    /// A helper that takes nothing and runs one PTX instruction (or a few, as one string) with no
    /// operands, `emulated` in the emulator; `memory`: nothing may move across it.
    pub fn instruction(name: &'static str, ptx: &'static str, memory: bool, emulated: Expr) -> DeviceFn {
        DeviceFn {
            ret: CType::Void,
            name,
            params: vec![],
            outputs: 0,
            body: vec![Stmt::Asm { ptx, outputs: vec![], inputs: vec![], memory, emulated }],
        }
    }
}

/// Shared arrays laid over a kernel's dynamic shared memory (`Stmt::SharedUnion`): the type's
/// size in bytes, which the launch passes and the printed code asserts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DynamicShared {
    pub bytes: usize,
}

/// An `extern "C" __global__` kernel and how it is launched.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    /// Printed above the kernel: what it computes, from which graph nodes and call sites.
    pub comments: Vec<String>,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
    pub launch: Launch,
    /// Blocks an SM should hold at once, as `__launch_bounds__`'s second number tells ptxas to
    /// budget registers for (`None`: the threads alone bound them). Tiles ask for it
    /// (`TilePlan::blocks_per_sm`); a kernel of several sections takes the smallest they ask.
    pub min_blocks: Option<u32>,
    /// Multiply-adds each thread does in the kernel's tiled product loop (0: no such loop), the
    /// measure of how long its blocks run that orders the sections of a side-by-side kernel
    /// (`side.rs`); a joined kernel takes its sections' largest.
    pub macs_per_thread: usize,
}

impl Kernel {
    /// A kernel with no register budget of its own and no tiled product loop.
    pub fn plain(name: &str, comments: Vec<String>, params: Vec<Param>, body: Vec<Stmt>, launch: Launch) -> Kernel {
        Kernel { name: name.into(), comments, params, body, launch, min_blocks: None, macs_per_thread: 0 }
    }

    /// Bytes of dynamic shared memory the kernel is launched with (0: its arrays are static).
    pub fn dynamic_shared_bytes(&self) -> usize {
        self.body
            .iter()
            .find_map(|s| match s {
                Stmt::SharedUnion { dynamic: Some(d), .. } => Some(d.bytes),
                _ => None,
            })
            .unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32),
    pub block: (u32, u32),
    /// Blocks per thread block cluster along x (1: no clusters), fixed when the kernel is
    /// compiled (`__cluster_dims__`), so the grid's x is a multiple of it (`cluster.rs`).
    pub cluster: u32,
}

/// One compilation unit: the prelude's helpers and the kernels of a program.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    pub helpers: Vec<DeviceFn>,
    pub kernels: Vec<Kernel>,
}
