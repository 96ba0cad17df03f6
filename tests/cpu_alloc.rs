//! Memory traffic of a steady-state training step on the CPU backend, counted by a global
//! allocator: temporaries and updated variables are planned once per shape signature and GEMM
//! packing buffers persist per thread, so a call allocates no buffer of activation size, only small
//! bookkeeping and the returned outputs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size(), Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn steady_state_step_allocates_no_activation_buffers() {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        eprintln!("skipped: without AVX-512F products go through matrixmultiply, which allocates per product");
        return;
    }
    let mut w = kiln::workloads::build("fmnist-mlp", kiln::Device::Cpu).unwrap();
    for _ in 0..3 {
        w.step.call(&w.args).unwrap();
    }
    BYTES.store(0, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    COUNT.store(0, Ordering::Relaxed);
    w.step.call(&w.args).unwrap();
    let (bytes, largest, count) =
        (BYTES.load(Ordering::Relaxed), LARGEST.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    eprintln!("one step: {count} allocations, {bytes} bytes, largest {largest} bytes");
    // The smallest activation of this step is 128 x 256 f32 = 128 KiB.
    let activation = 128 * 256 * 4;
    assert!(largest < activation, "an allocation of {largest} bytes in a steady-state step");
}
