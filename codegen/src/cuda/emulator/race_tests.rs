//! Unit tests of the emulator's race check: each rule it enforces fails on a small kernel that
//! breaks it, and passes the same kernel written correctly (a barrier, the last-block protocol).

use super::tests::{emulator, tid};
use super::*;
use crate::cuda::ast::*;

/// Runs `body` as kernel `k(const float* in, float* out, float* partial, unsigned* tickets)` on
/// `grid` blocks of `threads` under the race check; `in` holds 0, 1, ..., the others zeros
/// (64 elements each). Returns `out` and the launch's fault.
fn race_checked(body: Vec<Stmt>, grid: u32, threads: u32) -> (Vec<f32>, Option<String>) {
    race_checked_with(vec![], body, grid, threads)
}

/// `race_checked` with the prelude's `helpers`.
fn race_checked_with(helpers: Vec<DeviceFn>, body: Vec<Stmt>, grid: u32, threads: u32) -> (Vec<f32>, Option<String>) {
    let param = |ty, name: &str, kind| Param { ty, name: name.into(), kind };
    let params = vec![
        param(CType::Float, "in", ParamKind::In),
        param(CType::Float, "out", ParamKind::Out),
        param(CType::Float, "partial", ParamKind::InOut),
        param(CType::UInt, "tickets", ParamKind::InOut),
    ];
    let launch = Launch { grid: (grid, 1), block: (threads, 1), cluster: 1 };
    let module = Module { helpers, kernels: vec![Kernel::plain("k", vec![], params, body, launch)] };
    let lib = build::library(&build::unit(&module, &crate::cuda::print::module(&module), true)).unwrap();
    // SAFETY: the kernel's entry point and the race check's registration, as the shim defines them.
    let (f, register) = unsafe {
        (*lib.get::<EntryPoint>(b"kiln_emu_k").unwrap(), *lib.get::<RaceBuffers>(b"kiln_emu_race_buffers").unwrap())
    };
    let mut bufs: Vec<HostBuffer> = (0..4).map(|_| HostBuffer::new(64 * 4)).collect();
    bufs[0].write(&(0..64).flat_map(|i| (i as f32).to_ne_bytes()).collect::<Vec<u8>>());
    let names: Vec<std::ffi::CString> =
        ["in", "out", "partial", "tickets"].iter().map(|n| std::ffi::CString::new(*n).unwrap()).collect();
    let name_ptrs: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let mut args: Vec<*mut c_void> = bufs.iter_mut().map(|b| b.ptr()).collect();
    let (bytes, sizes) = ([256usize; 4], [4u32; 4]);
    // SAFETY: four buffers of 256 bytes for the kernel's four parameters.
    let report = unsafe {
        register(4, name_ptrs.as_ptr(), args.as_ptr(), bytes.as_ptr(), sizes.as_ptr());
        f(args.as_mut_ptr(), grid, 1, threads, 1, MIRRORED.with(|m| m.get()) as i32)
    };
    let fault = fault("k", report).err().map(|e| e.to_string());
    let out = bufs[1].data().chunks(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
    (out, fault)
}

fn bid() -> Expr {
    cast(CType::Int, Expr::Builtin(Builtin::BlockIdx))
}

fn shared_s() -> Stmt {
    Stmt::SharedArray { ty: CType::Float, name: "s".into(), len: 64, align: 0 }
}

/// `before`, a barrier or not, then `after`: the kernels whose race is the missing barrier.
fn split_by_barrier(before: Vec<Stmt>, barrier: bool, after: Vec<Stmt>) -> Vec<Stmt> {
    let barrier = if barrier { vec![Stmt::SyncThreads] } else { vec![] };
    before.into_iter().chain(barrier).chain(after).collect()
}

/// `out[t] = s[63 - t]` after every thread stored `s[t]`, with a barrier between or not.
fn reversal(barrier: bool) -> Vec<Stmt> {
    split_by_barrier(
        vec![shared_s(), assign(index(var("s"), tid()), index(var("in"), tid()))],
        barrier,
        vec![assign(index(var("out"), tid()), index(var("s"), int(63) - tid()))],
    )
}

#[test]
fn a_shared_read_without_a_barrier_after_the_write_is_a_race() {
    if !emulator() {
        return;
    }
    let (out, fault) = race_checked(reversal(true), 1, 64);
    assert_eq!(fault, None);
    assert_eq!(out[0], 63.0);
    for mirrored in [false, true] {
        let run = || race_checked(reversal(false), 1, 64);
        let (_, fault) = if mirrored { with_mirrored_schedule(run) } else { run() };
        let fault = fault.expect("a race");
        assert!(fault.contains("race on shared array s["), "{fault}");
        assert!(fault.contains("with no __syncthreads between"), "{fault}");
    }
}

#[test]
fn global_memory_within_a_block_needs_a_barrier_as_shared_memory_does() {
    if !emulator() {
        return;
    }
    // A single-block run's sections pass results through global memory: a section reading what
    // another thread of the block wrote in an earlier section needs the barrier between them.
    let sections = |barrier: bool| {
        let body = split_by_barrier(
            vec![assign(index(var("partial"), tid()), index(var("in"), tid()))],
            barrier,
            vec![assign(index(var("out"), tid()), index(var("partial"), int(63) - tid()))],
        );
        race_checked(body, 1, 64)
    };
    let (out, fault) = sections(true);
    assert_eq!((out[0], fault), (63.0, None));
    let fault = sections(false).1.expect("a race");
    assert!(fault.contains("race on partial[") && fault.contains("with no __syncthreads between"), "{fault}");
}

#[test]
fn a_shared_write_over_what_another_thread_reads_needs_a_barrier_too() {
    if !emulator() {
        return;
    }
    // Each thread reads its neighbour's element, then overwrites its own: the neighbour may not
    // have read it yet unless a barrier lies between (write after read).
    let war = |barrier: bool| {
        let body = split_by_barrier(
            vec![
                shared_s(),
                assign(index(var("s"), tid()), index(var("in"), tid())),
                Stmt::SyncThreads,
                decl(CType::Float, "v", index(var("s"), (tid() + int(1)) % int(64))),
            ],
            barrier,
            vec![assign(index(var("s"), tid()), var("v") * Expr::F32(2.0)), assign(index(var("out"), tid()), var("v"))],
        );
        race_checked(body, 1, 64)
    };
    assert_eq!(war(true).1, None);
    let fault = war(false).1.expect("a race");
    assert!(fault.contains("writes it, which thread") && fault.contains(" read, "), "{fault}");
}

#[test]
fn a_block_reading_what_another_block_of_the_launch_wrote_is_a_race() {
    if !emulator() {
        return;
    }
    // Block 0 writes partial[t]; block 1 reads it: nothing orders the two blocks.
    let body = vec![Stmt::If(
        bin(BinOp::Eq, bid(), int(0)),
        vec![assign(index(var("partial"), tid()), index(var("in"), tid()))],
        vec![assign(index(var("out"), tid()), index(var("partial"), tid()))],
    )];
    for mirrored in [false, true] {
        let run = || race_checked(body.clone(), 2, 32);
        let (_, fault) = if mirrored { with_mirrored_schedule(run) } else { run() };
        let fault = fault.expect("a race");
        assert!(fault.contains("race on partial[") && fault.contains("in another block"), "{fault}");
    }
    // Two blocks writing one element race too.
    let (_, fault) = race_checked(vec![assign(index(var("out"), tid()), index(var("in"), tid()))], 2, 32);
    assert!(fault.expect("a race").contains("in another block of the same launch"));
}

/// Each of two blocks stores its slice's value in `partial`, publishes it and takes a ticket; the
/// last block sums both slices. `fence`, `l2`, `ticket`: whether each part of the protocol is there.
fn last_block_sum(fence: bool, l2: bool, ticket: bool) -> Vec<Stmt> {
    let mut body = vec![
        Stmt::SharedArray { ty: CType::Bool, name: "last_block".into(), len: 1, align: 0 },
        assign(index(var("partial"), bid() * int(32) + tid()), index(var("in"), bid() * int(32) + tid())),
    ];
    if fence {
        body.push(Stmt::Call(call("__threadfence", vec![])));
    }
    body.push(Stmt::SyncThreads);
    let taken = call("atomicAdd", vec![var("tickets"), Expr::UInt(1)]);
    let last = if ticket { bin(BinOp::Eq, taken, Expr::UInt(1)) } else { bin(BinOp::Eq, bid(), int(0)) };
    body.push(Stmt::If(bin(BinOp::Eq, tid(), int(0)), vec![assign(index(var("last_block"), int(0)), last)], vec![]));
    body.push(Stmt::SyncThreads);
    let load = |at: Expr| if l2 { call("__ldcg", vec![var("partial") + at]) } else { index(var("partial"), at) };
    body.push(Stmt::If(
        index(var("last_block"), int(0)),
        vec![
            assign(index(var("out"), tid()), load(tid()) + load(tid() + int(32))),
            Stmt::If(bin(BinOp::Eq, tid(), int(0)), vec![assign(index(var("tickets"), int(0)), Expr::UInt(0))], vec![]),
        ],
        vec![],
    ));
    body
}

#[test]
fn the_last_block_protocol_passes_and_each_missing_part_is_named() {
    if !emulator() {
        return;
    }
    for mirrored in [false, true] {
        let run = |fence, l2, ticket| {
            let go = || race_checked(last_block_sum(fence, l2, ticket), 2, 32);
            if mirrored {
                with_mirrored_schedule(go)
            } else {
                go()
            }
        };
        let (out, fault) = run(true, true, true);
        assert_eq!(fault, None, "mirrored: {mirrored}");
        assert_eq!(out[..32], (0..32).map(|i| (2 * i + 32) as f32).collect::<Vec<_>>()[..]);
        let no_fence = run(false, true, true).1.unwrap_or_default();
        assert!(no_fence.contains("did not publish (__threadfence after the write)"), "{no_fence}");
        let plain_load = run(true, false, true).1.unwrap_or_default();
        assert!(plain_load.contains("not from L2 (__ldcg)"), "{plain_load}");
    }
    // Without the ticket, block 0 sums whenever it runs: the usual schedule runs it last (so it
    // reads the other block's slice, unordered), the mirrored one first (then block 1 writes what
    // block 0 read).
    let (_, usual) = race_checked(last_block_sum(true, true, false), 2, 32);
    assert!(usual.unwrap_or_default().contains("took no ticket (atomicAdd) first"));
    let (_, mirrored) = with_mirrored_schedule(|| race_checked(last_block_sum(true, true, false), 2, 32));
    assert!(mirrored.unwrap_or_default().contains("in another block of the same launch"));
}

#[test]
fn threads_may_each_write_a_bool_of_their_own() {
    if !emulator() {
        return;
    }
    // `flags[t] = in[t] > 10` from every thread, then `out[t] = flags[63 - t]`: four threads write
    // into each word of `flags`, each its own byte, so only the read needs the barrier. (A shared
    // array's elements are its own element size, not 4-byte words.)
    let flags = |barrier: bool| {
        let body = split_by_barrier(
            vec![
                Stmt::SharedArray { ty: CType::Bool, name: "flags".into(), len: 64, align: 0 },
                assign(index(var("flags"), tid()), bin(BinOp::Gt, index(var("in"), tid()), Expr::F32(10.0))),
            ],
            barrier,
            vec![assign(
                index(var("out"), tid()),
                select(index(var("flags"), int(63) - tid()), Expr::F32(1.0), Expr::F32(0.0)),
            )],
        );
        race_checked(body, 1, 64)
    };
    let (out, fault) = flags(true);
    assert_eq!(fault, None);
    assert_eq!((out[0], out[52], out[53]), (1.0, 1.0, 0.0));
    let fault = flags(false).1.expect("a race");
    assert!(fault.contains("race on shared array flags[") && fault.contains("(1-byte elements)"), "{fault}");
}

/// `s[t] = in[t]` by an asynchronous copy (with its wait for the copy or not, a barrier or not),
/// then `out[t] = s[63 - t]`.
fn reversal_by_copies(wait: bool, barrier: bool) -> Vec<Stmt> {
    use crate::cuda::tile_staging::{commit, wait as wait_for, COPY_HELPER};
    let copy = call(COPY_HELPER, vec![var("s") + tid(), var("in") + tid(), Expr::Bool(true)]);
    let mut before = vec![shared_s(), Stmt::Call(copy), commit()];
    if wait {
        before.push(wait_for(0));
    }
    split_by_barrier(before, barrier, vec![assign(index(var("out"), tid()), index(var("s"), int(63) - tid()))])
}

#[test]
fn an_asynchronous_copy_is_read_only_after_its_wait_and_a_barrier() {
    if !emulator() {
        return;
    }
    let helpers = || crate::cuda::tile_staging::helpers(2);
    let (out, fault) = race_checked_with(helpers(), reversal_by_copies(true, true), 1, 64);
    assert_eq!(fault, None);
    assert_eq!(out[..3], [63.0, 62.0, 61.0]);
    // Waited for but read by other threads before a barrier: a race.
    let (_, fault) = race_checked_with(helpers(), reversal_by_copies(true, false), 1, 64);
    let fault = fault.expect("a race");
    assert!(fault.contains("race on shared array s["), "{fault}");
    // Never waited for: the copy has not landed when the block reads it (NaN, as a GPU's shared
    // memory holds what was there), and the threads end with copies in flight.
    let (out, fault) = race_checked_with(helpers(), reversal_by_copies(false, true), 1, 64);
    assert!(out[0].is_nan(), "{out:?}");
    let fault = fault.expect("copies never waited for");
    assert!(fault.contains("asynchronous copies it never waited for"), "{fault}");
}

/// `s[4t + shift ..][..4] = in[4t ..][..4]` by one 16-byte asynchronous copy a thread (16 threads),
/// waited for and past a barrier, then `out[4t + i] = s[shift + 63 - 4t - i]`.
fn reversal_by_quad_copies(shift: i64) -> Vec<Stmt> {
    use crate::cuda::tile_staging::{commit, wait as wait_for, QUAD_COPY_HELPER};
    let quad = || tid() * int(4);
    let copy = call(QUAD_COPY_HELPER, vec![var("s") + quad() + int(shift), var("in") + quad(), Expr::Bool(true)]);
    let mut body = vec![
        Stmt::SharedArray { ty: CType::Float, name: "s".into(), len: 68, align: 16 },
        Stmt::Call(copy),
        commit(),
        wait_for(0),
        Stmt::SyncThreads,
    ];
    for i in 0..4 {
        let at = quad() + int(i);
        body.push(assign(index(var("out"), at.clone()), index(var("s"), int(shift + 63) - at)));
    }
    body
}

#[test]
fn a_quad_copy_moves_four_words_between_sixteen_byte_boundaries() {
    if !emulator() {
        return;
    }
    let helpers = || crate::cuda::tile_staging::helpers(2);
    let (out, fault) = race_checked_with(helpers(), reversal_by_quad_copies(0), 1, 16);
    assert_eq!(fault, None);
    assert_eq!(out[..5], [63.0, 62.0, 61.0, 60.0, 59.0]);
    // Into shared memory one word past a boundary: a GPU would fault, and so does the emulator.
    let (_, fault) = race_checked_with(helpers(), reversal_by_quad_copies(1), 1, 16);
    let fault = fault.expect("a misaligned copy");
    assert!(fault.contains("16-byte asynchronous copy from or to an address off a 16-byte boundary"), "{fault}");
}
