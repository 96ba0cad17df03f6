//! Unit tests of the emulator: each of its checks (barriers, shuffles, warp multiply-adds,
//! undefined behaviour, shared memory's garbage, the mirrored schedule) on a small kernel.

use super::*;
use crate::cuda::ast::*;
use crate::cuda::mma;

/// A one-kernel module `k(const float* in, float* out)` with `body`, launched on one block of
/// `threads`, over `input`; returns `out` (`out_len` floats) and whether its guards held.
/// Runs a one-block kernel of `body` over `in` and `out`; `portable`: with the fibers that
/// switch through ucontext (what machines other than x86-64 Linux use).
fn run_kernel_with(body: Vec<Stmt>, threads: u32, input: &[f32], out_len: usize, portable: bool) -> (Vec<f32>, bool) {
    let (out, guards, fault) = run_checked(body, threads, input, out_len, portable);
    assert_eq!(fault, None);
    (out, guards)
}

/// As `run_kernel_with`, also returning the undefined behaviour the launch reported.
fn run_checked(
    body: Vec<Stmt>,
    threads: u32,
    input: &[f32],
    out_len: usize,
    portable: bool,
) -> (Vec<f32>, bool, Option<String>) {
    run_with_helpers(body, vec![], threads, input, out_len, portable)
}

/// As `run_checked`, with `helpers` in the module's prelude.
fn run_with_helpers(
    body: Vec<Stmt>,
    helpers: Vec<DeviceFn>,
    threads: u32,
    input: &[f32],
    out_len: usize,
    portable: bool,
) -> (Vec<f32>, bool, Option<String>) {
    let params = vec![
        Param { ty: CType::Float, name: "in".into(), kind: ParamKind::In },
        Param { ty: CType::Float, name: "out".into(), kind: ParamKind::Out },
    ];
    let launch = Launch { grid: (1, 1), block: (threads, 1), cluster: 1 };
    let mut kernel = Kernel::plain("k", vec![], params, body, launch);
    crate::cuda::dynamic_shared::place(&mut kernel).unwrap();
    let module = Module { helpers, kernels: vec![kernel] };
    let mut unit = build::unit(&module, &crate::cuda::print::module(&module), RACE_CHECK.with(|r| r.get()));
    if portable {
        unit.insert_str(0, "#define KILN_EMU_UCONTEXT 1\n");
    }
    let lib = build::library(&unit).unwrap();
    // SAFETY: the entry point of the kernel above.
    let f = unsafe { lib.get::<EntryPoint>(b"kiln_emu_k") }.unwrap();
    let (mut a, mut b) = (HostBuffer::new(input.len() * 4), HostBuffer::new(out_len * 4));
    a.write(&input.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>());
    let mut args = [a.ptr(), b.ptr()];
    // SAFETY: two pointers for the kernel's two parameters.
    let report = unsafe { f(args.as_mut_ptr(), 1, 1, threads, 1, MIRRORED.with(|m| m.get()) as i32) };
    let fault = fault("k", report).err().map(|e| e.to_string());
    let out = b.data().chunks(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
    (out, a.guards_intact() && b.guards_intact(), fault)
}

fn run_kernel(body: Vec<Stmt>, threads: u32, input: &[f32], out_len: usize) -> (Vec<f32>, bool) {
    run_kernel_with(body, threads, input, out_len, false)
}

/// Whether the emulator runs here (where it cannot, the test says why and passes).
pub(super) fn emulator() -> bool {
    match unavailable_reason() {
        None => true,
        Some(why) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "note: emulator test skipped: {why}");
            false
        }
    }
}

pub(super) fn tid() -> Expr {
    cast(CType::Int, Expr::Builtin(Builtin::ThreadIdx))
}

/// The input of the 64-thread test kernels: 0, 1, ..., 63.
fn ramp() -> Vec<f32> {
    (0..64).map(|i| i as f32).collect()
}

#[test]
fn a_block_barrier_waits_for_every_thread() {
    if !emulator() {
        return;
    }
    // out[t] = in[63 - t] through shared memory: right only if every thread stored its element
    // before any thread read its partner's.
    let body = vec![
        Stmt::SharedArray { ty: CType::Float, name: "s".into(), len: 64, align: 0 },
        assign(index(var("s"), tid()), index(var("in"), tid())),
        Stmt::SyncThreads,
        assign(index(var("out"), tid()), index(var("s"), int(63) - tid())),
    ];
    let input = ramp();
    for portable in [false, true] {
        let (out, guards) = run_kernel_with(body.clone(), 64, &input, 64, portable);
        assert!(guards);
        assert_eq!(out, input.iter().rev().copied().collect::<Vec<_>>(), "portable fibers: {portable}");
    }
    let (out, _) = with_mirrored_schedule(|| run_kernel(body, 64, &input, 64));
    assert_eq!(out, input.iter().rev().copied().collect::<Vec<_>>(), "mirrored");
}

#[test]
fn warp_shuffles_read_the_partner_lanes_value() {
    if !emulator() {
        return;
    }
    // A warp sum by shuffles down 16, 8, 4, 2, 1; lane 0 of each warp writes its warp's sum.
    let mut body = vec![decl_mut(CType::Float, "v", index(var("in"), tid()))];
    for d in [16, 8, 4, 2, 1] {
        let shfl = call("__shfl_down_sync", vec![Expr::ULong(0xffff_ffff), var("v"), int(d)]);
        body.push(Stmt::Compound(BinOp::Add, var("v"), shfl));
    }
    let lane0 = bin(BinOp::Eq, tid() % int(32), int(0));
    body.push(Stmt::If(lane0, vec![assign(index(var("out"), tid() / int(32)), var("v"))], vec![]));
    let input = ramp();
    let want = vec![(0..32).sum::<i32>() as f32, (32..64).sum::<i32>() as f32];
    for portable in [false, true] {
        let (out, _) = run_kernel_with(body.clone(), 64, &input, 2, portable);
        assert_eq!(out, want, "portable fibers: {portable}");
    }
    assert_eq!(with_mirrored_schedule(|| run_kernel(body, 64, &input, 2)).0, want, "mirrored");
}

#[test]
fn a_write_past_the_end_breaks_the_guard() {
    if !emulator() {
        return;
    }
    let body = vec![assign(index(var("out"), tid() + int(1)), index(var("in"), tid()))];
    let (_, guards) = run_kernel(body, 16, &[1.0; 16], 16);
    assert!(!guards, "the 17th element is outside the buffer");
    let body = vec![assign(index(var("out"), tid()), index(var("in"), tid()))];
    assert!(run_kernel(body, 16, &[1.0; 16], 16).1);
}

#[test]
fn a_misaligned_vector_load_is_an_error_naming_the_kernel_and_line() {
    if !emulator() {
        return;
    }
    // `in + 1` is 4 bytes past a 16-byte boundary: fine on a CPU, a fault on a GPU.
    let load = |base: Expr| Expr::Lane(Box::new(Expr::Vec4(Box::new(base), Box::new(int(0)))), 0);
    let body = |base: Expr| vec![assign(index(var("out"), tid()), load(base))];
    let input = [1.0; 8];
    let (_, _, fault) = run_checked(body(var("in") + int(1)), 1, &input, 1, false);
    let fault = fault.expect("a misaligned float4 load is reported");
    assert!(fault.contains("emulated kernel k") && fault.contains("kiln-module.cu:"), "{fault}");
    assert!(fault.contains("float4'") && fault.contains("4 bytes past a 16-byte boundary"), "{fault}");
    let (out, _, fault) = run_checked(body(var("in") + int(4)), 1, &input, 1, false);
    assert_eq!((out, fault), (vec![1.0], None), "16 bytes in is aligned");
}

#[test]
fn a_shared_array_index_out_of_bounds_is_an_error() {
    if !emulator() {
        return;
    }
    // Shared memory has no guard bytes: the array's bound is what catches the 65th element.
    let body = |len: usize| {
        vec![
            Stmt::SharedArray { ty: CType::Float, name: "s".into(), len, align: 0 },
            assign(index(var("s"), tid() + int(1)), index(var("in"), tid())),
            Stmt::SyncThreads,
            assign(index(var("out"), tid()), index(var("s"), tid() + int(1))),
        ]
    };
    let input = ramp();
    let (_, _, fault) = run_checked(body(64), 64, &input, 64, false);
    let fault = fault.expect("s[64] is reported");
    assert!(fault.contains("array index out of bounds"), "{fault}");
    let (out, _, fault) = run_checked(body(65), 64, &input, 64, false);
    assert_eq!((out, fault), (input, None));
}

#[test]
fn shared_memory_a_block_never_wrote_holds_garbage_not_zeros() {
    if !emulator() {
        return;
    }
    // Only even threads store; every thread reads its own element. A thread_local array would
    // give the odd ones zeros (the first block) or the previous block's values; a GPU gives
    // whatever the memory held, which the emulator makes NaN.
    let even = bin(BinOp::Eq, tid() % int(2), int(0));
    let body = vec![
        Stmt::SharedArray { ty: CType::Float, name: "s".into(), len: 64, align: 16 },
        Stmt::If(even, vec![assign(index(var("s"), tid()), index(var("in"), tid()))], vec![]),
        Stmt::SyncThreads,
        assign(index(var("out"), tid()), index(var("s"), tid())),
    ];
    let input: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
    let (out, _) = run_kernel(body, 64, &input, 64);
    for (t, v) in out.iter().enumerate() {
        assert_eq!(v.is_nan(), t % 2 == 1, "thread {t} read {v}");
    }
}

#[test]
fn arrays_past_48_kib_live_in_dynamic_shared_memory_checked_as_static_ones() {
    if !emulator() {
        return;
    }
    // 64 KiB of floats, the last 64 written by the even threads and read by every thread: the odd
    // ones read garbage, as from a static array; one element further is out of bounds.
    let len = 16 * 1024;
    let body = |last: i64| {
        let at = || int(last - 63) + tid();
        let even = bin(BinOp::Eq, tid() % int(2), int(0));
        vec![
            Stmt::SharedArray { ty: CType::Float, name: "s".into(), len, align: 16 },
            Stmt::If(even, vec![assign(index(var("s"), at()), index(var("in"), tid()))], vec![]),
            Stmt::SyncThreads,
            assign(index(var("out"), tid()), index(var("s"), at())),
        ]
    };
    let input: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
    let (out, _, fault) = run_checked(body(len as i64 - 1), 64, &input, 64, false);
    assert_eq!(fault, None);
    for (t, v) in out.iter().enumerate() {
        assert_eq!(v.is_nan(), t % 2 == 1, "thread {t} read {v}");
        assert!(v.is_nan() || *v == input[t], "thread {t} read {v}");
    }
    let (_, _, fault) = run_checked(body(len as i64), 64, &input, 64, false);
    let fault = fault.expect("s[16384] is reported");
    assert!(fault.contains("array index out of bounds"), "{fault}");
}

#[test]
fn the_mirrored_schedule_shows_a_race_the_usual_one_hides() {
    if !emulator() {
        return;
    }
    // out[t] = s[t - 1] with no barrier after the stores: in the usual order thread t - 1 has
    // stored before thread t reads; mirrored, it has not (the garbage fill shows the read).
    let body = vec![
        Stmt::SharedArray { ty: CType::Float, name: "s".into(), len: 64, align: 0 },
        Stmt::SyncThreads,
        assign(index(var("s"), tid()), index(var("in"), tid())),
        Stmt::If(
            bin(BinOp::Lt, int(0), tid()),
            vec![assign(index(var("out"), tid()), index(var("s"), tid() - int(1)))],
            vec![],
        ),
    ];
    let input = ramp();
    let (usual, _) = run_kernel(body.clone(), 64, &input, 64);
    assert_eq!(usual[1..], input[..63], "the usual order hides the race");
    let (mirrored, _) = with_mirrored_schedule(|| run_kernel(body, 64, &input, 64));
    assert!(mirrored[1..].iter().all(|v| v.is_nan()), "{mirrored:?}");
}

#[test]
fn a_barrier_that_some_threads_never_reach_is_an_error() {
    if !emulator() {
        return;
    }
    // On a GPU these hang or go wrong: a barrier inside a branch some threads skip, threads
    // that return before the barrier, and two halves of a block waiting at different barriers.
    let low = || bin(BinOp::Lt, tid(), int(32));
    let store = || assign(index(var("out"), tid()), index(var("in"), tid()));
    let cases = [
        (vec![Stmt::If(low(), vec![Stmt::SyncThreads], vec![]), store()], "never reaches"),
        (vec![Stmt::If(low(), vec![Stmt::Return], vec![]), Stmt::SyncThreads, store()], "never reaches"),
        (vec![Stmt::If(low(), vec![Stmt::SyncThreads], vec![Stmt::SyncThreads]), store()], "different barriers"),
    ];
    let input = ramp();
    for (body, what) in cases {
        let (_, _, fault) = run_checked(body, 64, &input, 64, false);
        let fault = fault.unwrap_or_else(|| panic!("{what}: not reported"));
        assert!(fault.contains(what) && fault.contains("kiln-module.cu:"), "{fault}");
    }
    let every_thread = vec![Stmt::SyncThreads, store(), Stmt::SyncThreads];
    assert_eq!(run_checked(every_thread, 64, &input, 64, false).2, None);
}

#[test]
fn a_warp_shuffle_that_some_lanes_skip_is_an_error() {
    if !emulator() {
        return;
    }
    // Lanes 16-31 return before the shuffle that lanes 0-15 read them through.
    let shfl = call("__shfl_down_sync", vec![Expr::ULong(0xffff_ffff), var("v"), int(16)]);
    let body = vec![
        decl_mut(CType::Float, "v", index(var("in"), tid())),
        Stmt::If(bin(BinOp::Lt, int(15), tid()), vec![Stmt::Return], vec![]),
        assign(index(var("out"), tid()), shfl),
    ];
    let (_, _, fault) = run_checked(body, 32, &[1.0; 32], 32, false);
    let fault = fault.expect("reported");
    assert!(fault.contains("never reaches"), "{fault}");
}

/// A warp's m16n8k8 product of `a` (16x8, row-major, from `in[0..128]`) and `b` (8x8, from
/// `in[128..192]`) into `out` (16x8), each lane loading and storing its fragments where the PTX
/// ISA puts them; with `split`, as the tiles do it (high and low parts, three multiply-adds),
/// else the operands' high parts only.
fn warp_product(split: bool) -> Vec<Stmt> {
    let u = CType::UInt;
    let a = |row: Expr, k: Expr| index(var("in"), row * int(8) + k);
    let b = |k: Expr, col: Expr| index(var("in"), int(128) + k * int(8) + col);
    let (g, q) = (|| var("group"), || var("quad"));
    let words = [
        ("a0", a(g(), q())),
        ("a1", a(g() + int(8), q())),
        ("a2", a(g(), q() + int(4))),
        ("a3", a(g() + int(8), q() + int(4))),
        ("b0", b(q(), g())),
        ("b1", b(q() + int(4), g())),
    ];
    let mut body = vec![decl(CType::Int, "group", tid() / int(4)), decl(CType::Int, "quad", tid() % int(4))];
    for d in ["d0", "d1", "d2", "d3"] {
        body.push(decl_mut(CType::Float, d, Expr::F32(0.0)));
    }
    for (name, at) in words {
        body.push(decl(u, format!("{name}_hi"), call(mma::HIGH_HELPER, vec![at.clone()])));
        body.push(decl(u, format!("{name}_lo"), call(mma::LOW_HELPER, vec![at, var(format!("{name}_hi"))])));
    }
    let mma = |pa: &str, pb: &str| {
        let mut args: Vec<Expr> = ["d0", "d1", "d2", "d3"].iter().map(|&d| var(d)).collect();
        args.extend(["a0", "a1", "a2", "a3"].iter().map(|w| var(format!("{w}_{pa}"))));
        args.extend(["b0", "b1"].iter().map(|w| var(format!("{w}_{pb}"))));
        Stmt::Call(call(mma::MMA_HELPER, args))
    };
    if split {
        body.extend([mma("lo", "hi"), mma("hi", "lo")]);
    }
    body.push(mma("hi", "hi"));
    let out = |row: Expr, col: Expr| index(var("out"), row * int(8) + col);
    body.extend([
        assign(out(g(), q() * int(2)), var("d0")),
        assign(out(g(), q() * int(2) + int(1)), var("d1")),
        assign(out(g() + int(8), q() * int(2)), var("d2")),
        assign(out(g() + int(8), q() * int(2) + int(1)), var("d3")),
    ]);
    body
}

/// `a b` in f64, for the operands `warp_product` reads from `input`.
fn product_in_f64(input: &[f32]) -> Vec<f64> {
    let mut d = vec![0.0; 128];
    for (row, d_row) in d.chunks_mut(8).enumerate() {
        for (col, v) in d_row.iter_mut().enumerate() {
            *v = (0..8).map(|k| input[row * 8 + k] as f64 * input[128 + k * 8 + col] as f64).sum();
        }
    }
    d
}

#[test]
fn a_warp_multiply_add_follows_the_ptx_fragment_layout() {
    if !emulator() {
        return;
    }
    // Small integers are exact in TF32, so the product is exact wherever each lane's fragments
    // and outputs are where the PTX ISA says.
    let input: Vec<f32> =
        (0..192).map(|i| if i < 128 { (i * 5 % 7) as f32 - 3.0 } else { (i * 3 % 5) as f32 - 2.0 }).collect();
    let (out, _, fault) = run_with_helpers(warp_product(false), mma::helpers(), 32, &input, 128, false);
    assert_eq!(fault, None);
    let want: Vec<f32> = product_in_f64(&input).iter().map(|&v| v as f32).collect();
    assert_eq!(out, want);
}

#[test]
fn three_tf32_products_keep_float32_accuracy() {
    if !emulator() {
        return;
    }
    // Values with all 24 bits of mantissa: one TF32 product is off by about 2^-11 relative, the
    // high and low parts' three products by about float32's own rounding.
    let input: Vec<f32> = (0..192u32).map(|i| ((i.wrapping_mul(2654435761) >> 8) as f32 / 16777216.0) - 0.5).collect();
    let want = product_in_f64(&input);
    let scale: f64 = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
    // The split as compute capability 9.0 converts and as 8.0 rounds by integer arithmetic.
    for arch in ["sm_80", "sm_90"] {
        let worst = |split: bool| {
            let helpers = crate::cuda::with_target_arch(arch, mma::helpers);
            let (out, _, fault) = run_with_helpers(warp_product(split), helpers, 32, &input, 128, false);
            assert_eq!(fault, None);
            out.iter().zip(&want).map(|(&o, w)| (o as f64 - w).abs() / scale).fold(0.0, f64::max)
        };
        let (one, three) = (worst(false), worst(true));
        assert!(three < 4.0 * f32::EPSILON as f64, "{arch} 3xTF32: {three}");
        assert!(one > 100.0 * three, "{arch} 1xTF32 {one} vs 3xTF32 {three}");
    }
}

#[test]
fn the_tf32_split_is_exact_to_float32_and_keeps_infinities_and_nans_apart() {
    if !emulator() {
        return;
    }
    let mut input = vec![
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // a NaN whose payload lies only in the bits a TF32 drops
        f32::MAX,
        -f32::MAX,
        1.0 + 2f32.powi(-11), // a tie
        1e-40,                // subnormal
        0.0,
        -0.0,
    ];
    input.extend((0..54u32).map(|i| f32::from_bits(0x3000_0000 + i.wrapping_mul(0x0123_4567) % 0x1800_0000)));
    let word = || index(var("in"), tid());
    let body = vec![
        decl(CType::UInt, "hi", call(mma::HIGH_HELPER, vec![word()])),
        assign(index(var("out"), tid()), call("__uint_as_float", vec![var("hi")])),
        assign(
            index(var("out"), tid() + int(64)),
            call("__uint_as_float", vec![call(mma::LOW_HELPER, vec![word(), var("hi")])]),
        ),
    ];
    // The split as compute capability 9.0 converts and as 8.0 rounds by integer arithmetic.
    for arch in ["sm_80", "sm_90"] {
        let helpers = crate::cuda::with_target_arch(arch, mma::helpers);
        let (out, _, fault) = run_with_helpers(body.clone(), helpers, 64, &input, 128, false);
        assert_eq!(fault, None);
        for (i, &x) in input.iter().enumerate() {
            let (hi, lo) = (out[i], out[64 + i]);
            assert_eq!((hi.to_bits() & 0x1fff, lo.to_bits() & 0x1fff), (0, 0), "{arch} {x:e}: not TF32s");
            if x.is_nan() {
                assert!(lo.is_nan(), "{arch} {x}: {hi} {lo}");
            } else if x.is_infinite() {
                // The largest TF32 and the infinity: no part is a finite zero (which would make
                // `inf * 1.0` a NaN in the three products).
                assert!(hi == f32::from_bits(0x7f7f_e000).copysign(x) && lo == x, "{arch} {x}: {hi} {lo}");
            } else {
                // (A subnormal keeps what a TF32 holds of it: bits from 2^-136 up.)
                let err = (x as f64 - (hi as f64 + lo as f64)).abs();
                let bound = (x as f64).abs() * 2f64.powi(-21) + 2f64.powi(-137);
                assert!(hi.is_finite() && err <= bound, "{arch} {x:e}: {hi:e} + {lo:e}");
            }
        }
    }
}

#[test]
fn three_tf32_products_with_infinities_and_nans_are_float32_products() {
    if !emulator() {
        return;
    }
    // Rows of `a` each with one special value among small integers; columns of `b` of TF32s
    // (their low parts zero), zeros, infinities and NaNs: each output is what float32 gives,
    // down to the sign of an infinity and where a NaN comes out.
    let specials = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, 0.0];
    // (`b`'s other values are -1, 0 and 1, so that the largest float's products do not overflow
    // but where float32's would, whatever the order of the sum.)
    let mut input: Vec<f32> =
        (0..192).map(|i| if i < 128 { (i % 5) as f32 - 2.0 } else { (i % 3) as f32 - 1.0 }).collect();
    for row in 0..16 {
        input[row * 8 + row % 8] = specials[row % specials.len()];
    }
    for (col, special) in [(1, 0.0), (2, f32::INFINITY), (3, f32::NEG_INFINITY), (4, f32::NAN)] {
        input[128 + 8 * (col % 8) + col] = special;
    }
    for (i, v) in input[128..].iter_mut().enumerate() {
        if i % 8 == 5 {
            *v = 1.0 + 2f32.powi(-10); // a TF32, so its low part is zero
        }
    }
    // (The f64 product rounded to float32: it overflows where float32 does, the largest float
    // times 2 for one.)
    let want: Vec<f32> = product_in_f64(&input).iter().map(|&v| v as f32).collect();
    // The split as compute capability 9.0 converts and as 8.0 rounds by integer arithmetic.
    for arch in ["sm_80", "sm_90"] {
        let helpers = crate::cuda::with_target_arch(arch, mma::helpers);
        let (out, _, fault) = run_with_helpers(warp_product(true), helpers, 32, &input, 128, false);
        assert_eq!(fault, None);
        for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
            let same = match w.is_finite() {
                true => (o - w).abs() <= 1e-6 * w.abs().max(1.0),
                false => o.to_bits() == w.to_bits() || (o.is_nan() && w.is_nan()),
            };
            assert!(same, "{arch} output ({}, {}): {o} where float32 gives {w}", i / 8, i % 8);
        }
    }
}

#[test]
fn a_warp_multiply_add_that_some_lanes_skip_is_an_error() {
    if !emulator() {
        return;
    }
    let mut body = warp_product(false);
    let at = body.iter().position(|s| matches!(s, Stmt::Call(_))).expect("the multiply-add");
    body.insert(at, Stmt::If(bin(BinOp::Lt, int(15), tid()), vec![Stmt::Return], vec![]));
    let (_, _, fault) = run_with_helpers(body, mma::helpers(), 32, &[1.0; 192], 128, false);
    let fault = fault.expect("reported");
    assert!(fault.contains("warp multiply-add") && fault.contains("never reaches"), "{fault}");
}
