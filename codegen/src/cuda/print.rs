//! Prints the CUDA AST as C. Parentheses are added only where C's precedence needs them, floats
//! are printed so they read back exactly (shortest round-trip digits with an `f` suffix for
//! float; non-finite values through bit patterns), and the layout is fixed, so the same AST always
//! gives the same text.

use super::ast::*;
use super::emit::DeviceStep;
use std::fmt::Write;

const ATOM: u8 = 15;
const UNARY: u8 = 12;

fn precedence(e: &Expr) -> u8 {
    match e {
        Expr::Binary(op, ..) => op.precedence(),
        Expr::Select(..) => 0,
        Expr::Neg(_) | Expr::Not(_) | Expr::Cast(..) => UNARY,
        Expr::Int(v) if *v < 0 => UNARY,
        Expr::F32(v) if v.is_sign_negative() => UNARY,
        Expr::F64(v) if v.is_sign_negative() => UNARY,
        _ => ATOM,
    }
}

fn float_literal(v: f32) -> String {
    if v.is_nan() {
        "__int_as_float(0x7fffffff)".into()
    } else if v.is_infinite() {
        format!("__int_as_float({:#010x})", v.to_bits())
    } else {
        let s = format!("{v:?}");
        format!("{s}f")
    }
}

fn double_literal(v: f64) -> String {
    if v.is_nan() {
        "__longlong_as_double(0x7fffffffffffffffLL)".into()
    } else if v.is_infinite() {
        format!("__longlong_as_double({:#018x}LL)", v.to_bits())
    } else {
        format!("{v:?}")
    }
}

fn int_literal(v: i64) -> String {
    if v == i64::MIN {
        "(-9223372036854775807LL - 1)".into()
    } else if v > i32::MAX as i64 || v < i32::MIN as i64 {
        format!("{v}LL")
    } else {
        format!("{v}")
    }
}

pub fn expr(e: &Expr) -> String {
    let mut s = String::new();
    write_expr(&mut s, e, false);
    s
}

fn child(out: &mut String, e: &Expr, min: u8) {
    if precedence(e) < min {
        out.push('(');
        write_expr(out, e, false);
        out.push(')');
    } else {
        write_expr(out, e, false);
    }
}

fn write_expr(out: &mut String, e: &Expr, lvalue: bool) {
    match e {
        Expr::Var(n) => out.push_str(n),
        Expr::F32(v) => out.push_str(&float_literal(*v)),
        Expr::F64(v) => out.push_str(&double_literal(*v)),
        Expr::Int(v) => out.push_str(&int_literal(*v)),
        Expr::UInt(v) if *v > 0xffff => write!(out, "{v:#x}u").unwrap(),
        Expr::UInt(v) => write!(out, "{v}u").unwrap(),
        Expr::ULong(v) if *v > 0xffff => write!(out, "{v:#x}ULL").unwrap(),
        Expr::ULong(v) => write!(out, "{v}ULL").unwrap(),
        Expr::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Expr::Builtin(b) => out.push_str(match b {
            Builtin::ThreadIdx => "threadIdx.x",
            Builtin::BlockIdx => "blockIdx.x",
            Builtin::BlockDim => "blockDim.x",
            Builtin::GridDim => "gridDim.x",
            Builtin::ThreadIdxY => "threadIdx.y",
            Builtin::BlockIdxY => "blockIdx.y",
        }),
        Expr::Neg(a) => {
            out.push('-');
            child(out, a, ATOM);
        }
        Expr::Not(a) => {
            out.push('!');
            child(out, a, ATOM);
        }
        Expr::Binary(op, a, b) => {
            let p = op.precedence();
            child(out, a, p);
            write!(out, " {} ", op.symbol()).unwrap();
            child(out, b, p + 1);
        }
        Expr::Call(f, args) => {
            out.push_str(f);
            out.push('(');
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_expr(out, a, false);
            }
            out.push(')');
        }
        Expr::Cast(t, a) => {
            write!(out, "({})", t.name()).unwrap();
            child(out, a, ATOM);
        }
        Expr::Index(base, i) => {
            child(out, base, ATOM);
            out.push('[');
            write_expr(out, i, false);
            out.push(']');
        }
        Expr::Vec4(base, i) => {
            let ptr = if lvalue { "float4*" } else { "const float4*" };
            write!(out, "reinterpret_cast<{ptr}>(").unwrap();
            write_expr(out, base, false);
            out.push_str(")[");
            write_expr(out, i, false);
            out.push(']');
        }
        Expr::Lane(v, l) => {
            child(out, v, ATOM);
            out.push('.');
            out.push(['x', 'y', 'z', 'w'][*l as usize]);
        }
        Expr::Select(c, a, b) => {
            child(out, c, 1);
            out.push_str(" ? ");
            child(out, a, 1);
            out.push_str(" : ");
            child(out, b, 1);
        }
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("    ");
    }
}

fn block(out: &mut String, body: &[Stmt], depth: usize) {
    out.push_str("{\n");
    for s in body {
        stmt(out, s, depth + 1);
    }
    indent(out, depth);
    out.push('}');
}

fn stmt(out: &mut String, s: &Stmt, depth: usize) {
    indent(out, depth);
    match s {
        Stmt::Comment(c) => writeln!(out, "// {c}").unwrap(),
        Stmt::Decl { ty, name, init, constant } => {
            if *constant {
                out.push_str("const ");
            }
            write!(out, "{} {name}", ty.name()).unwrap();
            if let Some(e) = init {
                out.push_str(" = ");
                write_expr(out, e, false);
            }
            out.push_str(";\n");
        }
        Stmt::SharedArray { .. } => writeln!(out, "{}", shared_array(s, "__shared__ ")).unwrap(),
        Stmt::SharedUnion { name, members, dynamic: None } => {
            out.push_str("__shared__ union {\n");
            union_members(out, members, depth);
            indent(out, depth);
            writeln!(out, "}} {name};").unwrap();
        }
        Stmt::SharedUnion { name, members, dynamic: Some(d) } => {
            match &members[..] {
                [(member, arrays)] if member.is_empty() => {
                    writeln!(out, "struct {DYNAMIC_SHARED_TYPE} {{").unwrap();
                    for a in arrays {
                        indent(out, depth + 1);
                        writeln!(out, "{}", shared_array(a, "")).unwrap();
                    }
                }
                _ => {
                    writeln!(out, "union {DYNAMIC_SHARED_TYPE} {{").unwrap();
                    union_members(out, members, depth);
                }
            }
            indent(out, depth);
            out.push_str("};\n");
            indent(out, depth);
            writeln!(
                out,
                "static_assert(sizeof({DYNAMIC_SHARED_TYPE}) == {}, \"the dynamic shared memory of the launch\");",
                d.bytes
            )
            .unwrap();
            indent(out, depth);
            writeln!(out, "{DYNAMIC_SHARED_DECLARATION}").unwrap();
            indent(out, depth);
            writeln!(
                out,
                "{DYNAMIC_SHARED_TYPE}& {name} = *reinterpret_cast<{DYNAMIC_SHARED_TYPE}*>({DYNAMIC_SHARED_ARRAY});"
            )
            .unwrap();
        }
        Stmt::Assign(l, r) => {
            write_expr(out, l, true);
            out.push_str(" = ");
            write_expr(out, r, false);
            out.push_str(";\n");
        }
        Stmt::Compound(op, l, r) => {
            write_expr(out, l, true);
            write!(out, " {}= ", op.symbol()).unwrap();
            write_expr(out, r, false);
            out.push_str(";\n");
        }
        Stmt::If(c, then, otherwise) => {
            out.push_str("if (");
            write_expr(out, c, false);
            out.push_str(") ");
            block(out, then, depth);
            if !otherwise.is_empty() {
                out.push_str(" else ");
                block(out, otherwise, depth);
            }
            out.push('\n');
        }
        Stmt::For { ty, var, init, end, step, body } => {
            write!(out, "for ({} {var} = {}; {var} < {}; {var} += {}) ", ty.name(), expr(init), expr(end), expr(step))
                .unwrap();
            block(out, body, depth);
            out.push('\n');
        }
        Stmt::Return => out.push_str("return;\n"),
        Stmt::Break => out.push_str("break;\n"),
        Stmt::ReturnValue(e) => writeln!(out, "return {};", expr(e)).unwrap(),
        Stmt::SyncThreads => out.push_str("__syncthreads();\n"),
        Stmt::Pragma(text) => {
            // Preprocessor lines start at the margin.
            out.truncate(out.trim_end_matches(' ').len());
            writeln!(out, "#pragma {text}").unwrap();
        }
        Stmt::Call(e) => writeln!(out, "{};", expr(e)).unwrap(),
        Stmt::Block(body) => {
            block(out, body, depth);
            out.push('\n');
        }
        Stmt::Asm { ptx, outputs, inputs, memory, emulated } => {
            let operands = |ops: &[(&str, Expr)]| -> String {
                ops.iter().map(|(c, e)| format!("\"{c}\"({})", expr(e))).collect::<Vec<_>>().join(", ")
            };
            // Preprocessor lines start at the margin.
            out.truncate(out.trim_end_matches(' ').len());
            out.push_str("#ifdef __CUDA_ARCH__\n");
            indent(out, depth);
            let clobbers = if *memory { " : \"memory\"" } else { "" };
            writeln!(out, "asm volatile(\"{ptx}\" : {} : {}{clobbers});", operands(outputs), operands(inputs)).unwrap();
            out.push_str("#else\n");
            indent(out, depth);
            writeln!(out, "{};", expr(emulated)).unwrap();
            out.push_str("#endif\n");
        }
    }
}

/// A union's members, a struct of arrays a line.
fn union_members(out: &mut String, members: &[(String, Vec<Stmt>)], depth: usize) {
    for (member, arrays) in members {
        indent(out, depth + 1);
        out.push_str("struct {");
        for a in arrays {
            write!(out, " {}", shared_array(a, "")).unwrap();
        }
        writeln!(out, " }} {member};").unwrap();
    }
}

/// The type of a kernel's shared arrays laid over its dynamic shared memory.
pub(crate) const DYNAMIC_SHARED_TYPE: &str = "kiln_shared";

/// The array of a kernel's dynamic shared memory.
pub(crate) const DYNAMIC_SHARED_ARRAY: &str = "kiln_shared_bytes";

/// Its declaration, on a line of its own (which the emulator gives storage: `emulator/build.rs`).
pub(crate) const DYNAMIC_SHARED_DECLARATION: &str =
    "extern __shared__ __align__(16) unsigned char kiln_shared_bytes[];";

/// `[alignas(N) ]{qualifier}type name[len];` for a `Stmt::SharedArray`.
fn shared_array(s: &Stmt, qualifier: &str) -> String {
    let Stmt::SharedArray { ty, name, len, align } = s else { unreachable!("a shared array") };
    let aligned = if *align > 0 { format!("alignas({align}) ") } else { String::new() };
    format!("{aligned}{qualifier}{} {name}[{len}];", ty.name())
}

fn param(p: &Param) -> String {
    match p.kind {
        ParamKind::In => format!("const {}* __restrict__ {}", p.ty.name(), p.name),
        ParamKind::Out => format!("{}* __restrict__ {}", p.ty.name(), p.name),
        ParamKind::InOut => format!("{}* {}", p.ty.name(), p.name),
        ParamKind::InAliased => format!("const {}* {}", p.ty.name(), p.name),
        ParamKind::Value => format!("{} {}", p.ty.name(), p.name),
    }
}

pub fn device_fn(out: &mut String, f: &DeviceFn) {
    let reference = |i: usize| if i < f.outputs { "&" } else { "" };
    let params: Vec<String> =
        f.params.iter().enumerate().map(|(i, (t, n))| format!("{}{} {n}", t.name(), reference(i))).collect();
    write!(out, "__device__ __forceinline__ {} {}({}) ", f.ret.name(), f.name, params.join(", ")).unwrap();
    block(out, &f.body, 0);
    out.push_str("\n\n");
}

pub fn kernel(out: &mut String, k: &Kernel) {
    for c in &k.comments {
        writeln!(out, "// {c}").unwrap();
    }
    let l = k.launch;
    let cluster = clusters_of(&l);
    writeln!(out, "// launch: grid ({}, {}), block ({}, {}){cluster}", l.grid.0, l.grid.1, l.block.0, l.block.1)
        .unwrap();
    let params: Vec<String> = k.params.iter().map(param).collect();
    let threads = l.block.0 * l.block.1;
    let bounds = match k.min_blocks {
        Some(blocks) => format!("{threads}, {blocks}"),
        None => threads.to_string(),
    };
    // A cluster's size is the kernel's own, fixed when it is compiled: a plain launch (and a
    // graph's kernel node) then forms the clusters, with no launch attribute to pass.
    let dims = if l.cluster > 1 { format!(" __cluster_dims__({}, 1, 1)", l.cluster) } else { String::new() };
    write!(out, "extern \"C\" __global__ void __launch_bounds__({bounds}){dims} {}({}) ", k.name, params.join(", "))
        .unwrap();
    block(out, &k.body, 0);
    out.push_str("\n\n");
}

/// How a launch's blocks are grouped in clusters, as its comments say it (nothing without).
fn clusters_of(l: &Launch) -> String {
    if l.cluster > 1 {
        format!(", clusters of {}", l.cluster)
    } else {
        String::new()
    }
}

/// A product's operands as the step list names them: `4096x784 times 784x256^T` (and `, N items`
/// for a batch).
pub(crate) fn product_operands(mm: &crate::kernel::MatMul) -> String {
    let t = |yes: bool| if yes { "^T" } else { "" };
    let batch = if mm.batch > 1 { format!(", {} items", mm.batch) } else { String::new() };
    let (m, k, n) = (mm.m, mm.k, mm.n);
    format!("{m}x{k}{} times {k}x{n}{}{batch}", t(mm.a_transposed), t(mm.b_transposed))
}

/// The whole compilation unit.
pub fn module(m: &Module) -> String {
    program(m, &[])
}

/// The compilation unit of a program, headed by the order in which its steps launch kernels and
/// cuBLAS products (so a reader sees the whole step, not only the kernels).
pub fn program(m: &Module, steps: &[DeviceStep]) -> String {
    let mut out = String::from("// Generated by kiln. Do not edit.\n");
    if !steps.is_empty() {
        out.push_str("// The step, in launch order:\n");
    }
    for s in steps {
        match s {
            DeviceStep::Launch(l) => {
                let (g, b) = (l.launch.grid, l.launch.block);
                let cluster = clusters_of(&l.launch);
                writeln!(out, "//   {}: grid ({}, {}), block ({}, {}){cluster}", l.kernel, g.0, g.1, b.0, b.1).unwrap()
            }
            DeviceStep::Gemm(mm) => writeln!(out, "//   {}: cuBLAS {}", mm.name, product_operands(mm)).unwrap(),
            DeviceStep::GemmLt(g) => writeln!(out, "//   {}: {}", g.mm.name, g.describe()).unwrap(),
        }
    }
    out.push('\n');
    for f in &m.helpers {
        device_fn(&mut out, f);
    }
    for k in &m.kernels {
        kernel(&mut out, k);
    }
    out
}

/// The module cut into at most `parts` compilation units of consecutive whole kernels, balanced by
/// printed size, each with the helpers its kernels call (and those call), in the module's order;
/// with the indices of its kernels. NVRTC compiles the units on threads of their own
/// (`nvrtc::compile_module`); a unit that holds only the helpers it needs stays the same text
/// (and so is found in NVRTC's caches) when another unit's kernel starts calling a helper.
pub fn module_parts(m: &Module, parts: usize) -> Vec<(String, Vec<usize>)> {
    let helpers: Vec<(&str, String)> = m
        .helpers
        .iter()
        .map(|f| {
            let mut s = String::new();
            device_fn(&mut s, f);
            (f.name, s)
        })
        .collect();
    let texts: Vec<String> = m
        .kernels
        .iter()
        .map(|k| {
            let mut s = String::new();
            kernel(&mut s, k);
            s
        })
        .collect();
    let parts = parts.clamp(1, texts.len().max(1));
    let per_part = texts.iter().map(String::len).sum::<usize>().div_ceil(parts);
    let mut groups: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, t) in texts.iter().enumerate() {
        if size > 0 && size + t.len() > per_part && groups.len() < parts {
            groups.push(vec![]);
            size = 0;
        }
        size += t.len();
        groups.last_mut().expect("one group at least").push(i);
    }
    groups
        .into_iter()
        .map(|kernels| {
            let body: String = kernels.iter().map(|&i| texts[i].as_str()).collect();
            // A helper is needed if a kernel of the unit or a needed helper calls it.
            let mut needed = vec![false; helpers.len()];
            loop {
                let mut more = false;
                for (h, (name, _)) in helpers.iter().enumerate() {
                    let call = format!("{name}(");
                    let called = body.contains(&call)
                        || helpers
                            .iter()
                            .zip(&needed)
                            .any(|((other, text), &n)| n && other != name && text.contains(&call));
                    if called && !needed[h] {
                        needed[h] = true;
                        more = true;
                    }
                }
                if !more {
                    break;
                }
            }
            let mut unit = String::from("// Generated by kiln. Do not edit.\n\n");
            for ((_, text), _) in helpers.iter().zip(&needed).filter(|(_, &n)| n) {
                unit.push_str(text);
            }
            unit.push_str(&body);
            (unit, kernels)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parentheses_follow_precedence() {
        let e = (var("a") + var("b")) * var("c") - var("d") / (var("e") - var("f"));
        assert_eq!(expr(&e), "(a + b) * c - d / (e - f)");
        let e = var("a") - (var("b") - var("c"));
        assert_eq!(expr(&e), "a - (b - c)");
        let e = cast(CType::Float, var("x") + int(1));
        assert_eq!(expr(&e), "(float)(x + 1)");
        assert_eq!(
            expr(&select(bin(BinOp::Lt, var("x"), Expr::F32(0.0)), Expr::F32(-0.5), var("x"))),
            "x < 0.0f ? -0.5f : x"
        );
    }

    #[test]
    fn literals_read_back_exactly() {
        assert_eq!(expr(&Expr::F32(0.1)), "0.1f");
        assert_eq!(expr(&Expr::F32(f32::INFINITY)), "__int_as_float(0x7f800000)");
        assert_eq!(expr(&Expr::F32(f32::NEG_INFINITY)), "__int_as_float(0xff800000)");
        assert_eq!(expr(&Expr::F64(1e-300)), "1e-300");
        assert_eq!(expr(&Expr::Int(1 << 40)), "1099511627776LL");
        assert_eq!(expr(&Expr::Int(i64::MIN)), "(-9223372036854775807LL - 1)");
    }

    #[test]
    fn module_parts_hold_every_kernel_once_in_order_with_the_helpers_they_call() {
        let helper = |name: &'static str, body: Vec<Stmt>| DeviceFn {
            ret: CType::Float,
            name,
            params: vec![],
            outputs: 0,
            body,
        };
        // kiln_outer calls kiln_inner; kernel 2 calls kiln_outer, kernel 5 kiln_alone.
        let helpers = vec![
            helper("kiln_inner", vec![Stmt::ReturnValue(Expr::F32(1.0))]),
            helper("kiln_outer", vec![Stmt::ReturnValue(call("kiln_inner", vec![]))]),
            helper("kiln_alone", vec![Stmt::ReturnValue(Expr::F32(2.0))]),
        ];
        let kernel = |i: usize, lines: usize| {
            let mut body: Vec<Stmt> = (0..lines).map(|l| Stmt::Comment(format!("line {l}"))).collect();
            match i {
                2 => body.push(Stmt::Call(call("kiln_outer", vec![]))),
                5 => body.push(Stmt::Call(call("kiln_alone", vec![]))),
                _ => {}
            }
            Kernel::plain(&format!("k{i}"), vec![], vec![], body, Launch { grid: (1, 1), block: (32, 1), cluster: 1 })
        };
        let m = Module { helpers, kernels: (0..7).map(|i| kernel(i, if i == 2 { 40 } else { 5 })).collect() };
        for parts in [1, 2, 3, 8, 20] {
            let units = module_parts(&m, parts);
            assert!(units.len() <= parts.min(7), "{parts}: {} units", units.len());
            let order: Vec<usize> = units.iter().flat_map(|(_, k)| k.clone()).collect();
            assert_eq!(order, (0..7).collect::<Vec<_>>());
            for (text, kernels) in &units {
                assert!(!kernels.is_empty());
                for i in 0..7 {
                    assert_eq!(text.contains(&format!(" k{i}(")), kernels.contains(&i), "{parts} parts");
                }
                let defines = |h: &str| text.contains(&format!("float {h}() "));
                assert_eq!(defines("kiln_outer"), kernels.contains(&2), "{parts} parts:\n{text}");
                assert_eq!(defines("kiln_inner"), kernels.contains(&2), "{parts} parts:\n{text}");
                assert_eq!(defines("kiln_alone"), kernels.contains(&5), "{parts} parts:\n{text}");
                // Defined before use, in the module's order.
                if kernels.contains(&2) {
                    assert!(text.find("float kiln_inner() ").unwrap() < text.find("float kiln_outer() ").unwrap());
                }
            }
        }
        // One unit is the module as printed (where every helper is called).
        assert_eq!(module_parts(&m, 1)[0].0, module(&m));
    }

    #[test]
    fn inline_ptx_is_printed_for_nvrtc_with_the_emulators_call_beside_it() {
        let f = DeviceFn {
            ret: CType::Void,
            name: "kiln_twice",
            params: vec![(CType::Float, "d"), (CType::UInt, "a")],
            outputs: 1,
            body: vec![Stmt::Asm {
                ptx: "add.f32 %0, %0, %0;",
                outputs: vec![("+f", var("d"))],
                inputs: vec![("r", var("a"))],
                memory: false,
                emulated: call("kiln_emu_twice", vec![var("d"), var("a")]),
            }],
        };
        let mut out = String::new();
        device_fn(&mut out, &f);
        assert_eq!(
            out,
            "__device__ __forceinline__ void kiln_twice(float& d, unsigned int a) {\n\
             #ifdef __CUDA_ARCH__\n    asm volatile(\"add.f32 %0, %0, %0;\" : \"+f\"(d) : \"r\"(a));\n\
             #else\n    kiln_emu_twice(d, a);\n#endif\n}\n\n"
        );
        assert_eq!(expr(&Expr::UInt(0xffff_e000)), "0xffffe000u");
        assert_eq!(expr(&Expr::UInt(4096)), "4096u");
    }
}
