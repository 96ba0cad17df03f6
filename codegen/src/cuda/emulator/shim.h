// kiln's CUDA emulator: what the CUDA C that kiln prints needs to compile as C++ and run on the CPU.
// Blocks run one after another (last block first: any order is a legal schedule, and the reverse
// of the usual one finds code that leans on it; the mirrored schedule runs them first to last and
// a block's threads last to first). The threads of a block run one after another too unless the
// kernel waits on its block (__syncthreads) or its warp (shuffles): then each thread is a fiber
// with its own stack, and a round-robin scheduler resumes them, so every thread reaches a barrier
// before any passes it, and every lane of a warp has offered its value before any lane reads its
// partner's. `__shared__` arrays are thread_local statics: one per block, since one
// OS thread runs one block at a time. Atomics are plain read-modify-writes (one block runs at a
// time; the blocks of a thread block cluster run each on an OS thread of its own, but one at a
// time too: cluster.h).
// With KILN_EMU_RACECHECK defined (and the unit compiled with the thread sanitizer's
// instrumentation), every load and store is also checked against CUDA's ordering rules: see "The
// race check" in race.h.
// On x86-64 a fiber switch saves the callee-saved registers and swaps stack pointers (a tiled
// product's block switches a few thousand times); elsewhere (or with KILN_EMU_UCONTEXT defined, as a
// test does) ucontext does it, with a system call per switch for the signal mask.
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

// The race check's instrumentation (see below) skips what the shim itself does to memory.
#ifdef KILN_EMU_RACECHECK
#define KILN_EMU_UNCHECKED __attribute__((no_sanitize_thread))
#else
#define KILN_EMU_UNCHECKED
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local

struct kiln_uint3 {
    unsigned x, y, z;
};
static thread_local kiln_uint3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) uint2 {
    unsigned x, y;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

#if defined(__x86_64__) && defined(__linux__) && !defined(KILN_EMU_UCONTEXT)
#define KILN_EMU_FAST_SWITCH 1
// kiln_emu_switch(from, to): pushes the callee-saved registers, stores the stack pointer in *from,
// loads `to` and pops that fiber's registers; `ret` resumes it where it switched away.
extern "C" void kiln_emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl kiln_emu_switch
    .hidden kiln_emu_switch
    .type kiln_emu_switch, @function
kiln_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size kiln_emu_switch, .-kiln_emu_switch
)");
#endif

namespace kiln_emu {
// The race check's side of the emulator (race.h, which follows this shim in every unit: the check
// itself where KILN_EMU_RACECHECK is defined, else nothing).
static void race_shared(const char* name, void* at, size_t bytes, unsigned granule);
static void race_launch(size_t blocks, size_t threads_per_block);
static void race_enter(unsigned t, unsigned barriers);
static void race_fence();
static void race_mark(bool coherent_load, bool atomic_access);
static void race_mark_cluster(bool cluster_load);
static void race_enter_cluster(unsigned cluster_barriers);
static void* race_current();
static void race_adopt(void* state);
static void race_forget_shared();

enum State { READY, AT_SHUFFLE, AT_SYNC, DONE };
struct Fiber {
#ifdef KILN_EMU_FAST_SWITCH
    void* sp;
#else
    ucontext_t ctx;
#endif
    State state;
    unsigned x, y;
    unsigned char parity;
    // The module line of the __syncthreads the fiber waits at.
    unsigned sync_line;
    // Shuffles the fiber has offered a value to.
    unsigned shuffles;
    // Block barriers the fiber has passed (what orders its memory accesses with its block's).
    unsigned barriers;
    // Cluster barriers the fiber has passed (each also a block barrier), and whether it waits at one.
    unsigned cluster_barriers;
    bool at_cluster;
};
const unsigned MAX_THREADS = 1024;
const size_t STACK_BYTES = 128 * 1024;
static thread_local Fiber* fibers = nullptr;
static thread_local char* stacks = nullptr;
#ifdef KILN_EMU_FAST_SWITCH
static thread_local void* scheduler = nullptr;
#else
static thread_local ucontext_t scheduler;
#endif
static thread_local unsigned current = 0;
// The mirrored schedule: blocks first to last, and the threads of a block last to first. A race
// that one schedule hides (a thread reading, without a barrier, what a lower thread wrote: the
// usual order ran that thread first) the other shows.
static thread_local bool mirrored = false;
static thread_local unsigned block_threads = 0;
static thread_local bool in_fibers = false;
// The kernel being run, and its arguments (as cuLaunchKernel takes them).
typedef void (*Body)(void**);
static thread_local Body body = nullptr;
static thread_local void** body_args = nullptr;
// Each lane's offered value, double-buffered by the parity of the lane's shuffle count: a lane can
// offer its next value while slower lanes still read the previous one.
static thread_local unsigned long long offered[2][MAX_THREADS];

// Each thread's asynchronous copies (cp.async) not yet waited for: a copy lands when its thread
// waits for its group, as late as a GPU may land it (and its destination is poisoned when it is
// issued), so that a slab read before the wait and the barrier after it reads NaNs here.
struct AsyncCopy {
    float* dst;
    const float* src;
    bool inside;
    // The group the copy belongs to: the number of groups its thread had committed when it issued it.
    unsigned group;
};
const unsigned MAX_ASYNC_COPIES = 64;
static thread_local AsyncCopy* async_copies = nullptr;  // MAX_THREADS x MAX_ASYNC_COPIES, when first used
static thread_local unsigned async_pending[MAX_THREADS];
static thread_local unsigned async_committed[MAX_THREADS];
static thread_local unsigned long long async_epoch[MAX_THREADS];

// The first fault of the launch being run (undefined behaviour, a barrier not every thread
// reaches), which the entry point returns; empty if none.
static thread_local char fault[512];
static void record_fault(const char* what) {
    if (!fault[0]) snprintf(fault, sizeof fault, "%s", what);
}

[[noreturn]] static void fail(const char* what) {
    fprintf(stderr, "kiln CUDA emulator: %s\n", what);
    abort();
}

static void yield(State s) {
    if (!in_fibers) fail("a kernel waited on a barrier outside a fiber (the emulator missed its barrier)");
    Fiber& f = fibers[current];
    f.state = s;
#ifdef KILN_EMU_FAST_SWITCH
    kiln_emu_switch(&f.sp, scheduler);
#else
    swapcontext(&f.ctx, &scheduler);
#endif
}

static void trampoline() {
    body(body_args);
    fibers[current].state = DONE;
#ifdef KILN_EMU_FAST_SWITCH
    kiln_emu_switch(&fibers[current].sp, scheduler);
    __builtin_unreachable();
#else
    swapcontext(&fibers[current].ctx, &scheduler);
#endif
}

// A GPU's shared memory starts each block holding whatever was there; a thread_local array would
// hold the previous block's values, or zeros in the first block, and hide a read of an element
// the block never wrote. So each `__shared__` array is filled with 0xff bytes (NaN floats, -1
// integers) the first time a block reaches its declaration (the declarations are followed by
// KILN_EMU_SHARED(name) in the emulator's copy of the module, on the same line).
static void cluster_register(void* at, size_t bytes, const char* name);
static thread_local unsigned long long block_epoch = 0;
struct Poisoned {
    void* at;
    unsigned long long epoch;
};
const unsigned MAX_POISONED = 256;
static thread_local Poisoned poisoned[MAX_POISONED];
static thread_local unsigned poisoned_count = 0;
KILN_EMU_UNCHECKED static void poison_once(void* at, size_t bytes, const char* name, unsigned granule) {
    for (unsigned i = 0; i < poisoned_count; i++) {
        if (poisoned[i].at != at) continue;
        if (poisoned[i].epoch != block_epoch) {
            memset(at, 0xff, bytes);
            race_shared(name, at, bytes, granule);
            cluster_register(at, bytes, name);
            poisoned[i].epoch = block_epoch;
        }
        return;
    }
    if (poisoned_count == MAX_POISONED) {
        // Forget the arrays of earlier blocks (this block's are few, and must stay remembered).
        unsigned kept = 0;
        for (unsigned i = 0; i < poisoned_count; i++)
            if (poisoned[i].epoch == block_epoch) poisoned[kept++] = poisoned[i];
        poisoned_count = kept;
    }
    poisoned[poisoned_count++] = Poisoned{at, block_epoch};
    memset(at, 0xff, bytes);
    race_shared(name, at, bytes, granule);
    cluster_register(at, bytes, name);
}

static void check_async_copies_landed(unsigned n);
// Thread block clusters (cluster.h, which follows this shim in every unit).
static void cluster_wait();
static void launch_clusters(unsigned size, bool barriers, Body fn, void** args);

static void run_block(unsigned bx, unsigned by, bool barriers, Body fn, void** args) {
    unsigned n = bx * by;
    block_epoch++;
    if (!barriers) {
        for (unsigned i = 0; i < n; i++) {
            unsigned t = mirrored ? n - 1 - i : i;
            threadIdx = kiln_uint3{t % bx, t / bx, 0};
            race_enter(t, 0);
            fn(args);
        }
        return;
    }
    if (n > MAX_THREADS) fail("a block of more than 1024 threads");
    if (!fibers) {
        fibers = new Fiber[MAX_THREADS];
        stacks = new char[MAX_THREADS * STACK_BYTES];
    }
    body = fn;
    body_args = args;
    block_threads = n;
    for (unsigned t = 0; t < n; t++) {
        Fiber& f = fibers[t];
#ifdef KILN_EMU_FAST_SWITCH
        // The first switch to the fiber pops six zero registers and returns into `trampoline`,
        // with the stack aligned as at a function's entry (16-byte aligned plus the return slot).
        uintptr_t top = ((uintptr_t)(stacks + (size_t)(t + 1) * STACK_BYTES)) & ~(uintptr_t)15;
        void** frame = (void**)top;
        frame[-1] = nullptr;
        frame[-2] = (void*)&trampoline;
        for (int r = 3; r <= 8; r++) frame[-r] = nullptr;
        f.sp = (void*)&frame[-8];
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks + (size_t)t * STACK_BYTES;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
#endif
        f.state = READY;
        f.x = t % bx;
        f.y = t / bx;
        f.parity = 0;
        f.shuffles = 0;
        f.barriers = 0;
        f.cluster_barriers = 0;
        f.at_cluster = false;
    }
    in_fibers = true;
    for (;;) {
        bool ran = false;
        for (unsigned i = 0; i < n; i++) {
            unsigned t = mirrored ? n - 1 - i : i;
            Fiber& f = fibers[t];
            if (f.state != READY && f.state != AT_SHUFFLE) continue;
            current = t;
            threadIdx = kiln_uint3{f.x, f.y, 0};
            race_enter(t, f.barriers);
            race_enter_cluster(f.cluster_barriers);
            f.state = READY;
#ifdef KILN_EMU_FAST_SWITCH
            kiln_emu_switch(&scheduler, f.sp);
#else
            swapcontext(&scheduler, &f.ctx);
#endif
            ran = true;
        }
        if (ran) continue;
        // Every thread left is at __syncthreads: release them all. On a GPU every thread of the
        // block must reach the same barrier (else it hangs or goes wrong), so a barrier that some
        // threads returned before, or threads at different barriers, is a fault. At a cluster
        // barrier the block waits for the cluster's other blocks first.
        bool waiting = false, at_cluster = false;
        unsigned done = n, line = 0;
        for (unsigned t = 0; t < n; t++) {
            if (fibers[t].state == DONE && done == n) done = t;
            if (fibers[t].state != AT_SYNC) continue;
            char what[200];
            if (waiting && fibers[t].sync_line != line) {
                if (fibers[t].at_cluster || at_cluster)
                    snprintf(what, sizeof what, "threads of a block wait at different barriers (one a cluster barrier)");
                else
                    snprintf(what, sizeof what, "threads of a block wait at different barriers (kiln-module.cu:%u and :%u)",
                             line, fibers[t].sync_line);
                record_fault(what);
            }
            line = fibers[t].sync_line;
            at_cluster |= fibers[t].at_cluster;
            fibers[t].state = READY;
            fibers[t].at_cluster = false;
            waiting = true;
        }
        if (waiting && done < n) {
            char what[200];
            snprintf(what, sizeof what, "kiln-module.cu:%u: a barrier that thread %u of block (%u, %u) never reaches",
                     line, done, blockIdx.x, blockIdx.y);
            record_fault(what);
        }
        if (!waiting) break;
        if (at_cluster) cluster_wait();
    }
    in_fibers = false;
    check_async_copies_landed(n);
}

static void launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, bool barriers, Body fn, void** args,
                   bool mirror, unsigned cluster_size) {
    gridDim = kiln_uint3{gx, gy, 1};
    blockDim = kiln_uint3{bx, by, 1};
    mirrored = mirror;
    race_launch((size_t)gx * gy, (size_t)bx * by);
    if (cluster_size > 1) {
        launch_clusters(cluster_size, barriers, fn, args);
        return;
    }
    for (unsigned j = 0; j < gy; j++) {
        for (unsigned i = 0; i < gx; i++) {
            unsigned x = mirrored ? i : gx - 1 - i, y = mirrored ? j : gy - 1 - j;
            blockIdx = kiln_uint3{x, y, 0};
            run_block(bx, by, barriers, fn, args);
        }
    }
}

// Each lane's fragments offered to a warp multiply-add (A's four words, then B's two),
// double-buffered by the lane's parity like shuffles (with which they share the count).
static thread_local unsigned mma_offered[2][MAX_THREADS][6];

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 on the fragment layout of the PTX ISA: lane
// l = 4 group + quad holds A[group + 8 (r % 2)][quad + 4 (r / 2)] in a[r], B[quad + 4 r][group] in
// b[r], and D[group + 8 (i / 2)][2 quad + i % 2] in d[i]. A word is read as a TF32 (its low 13 bits
// dropped); products of TF32s are exact in float32, and each is added in k order.
static void mma_tf32(float* d, const unsigned* a, const unsigned* b) {
    unsigned t = current;
    Fiber& f = fibers[t];
    unsigned p = f.parity;
    f.parity ^= 1;
    memcpy(mma_offered[p][t], a, 4 * sizeof(unsigned));
    memcpy(mma_offered[p][t] + 4, b, 2 * sizeof(unsigned));
    unsigned nth = ++f.shuffles;
    yield(AT_SHUFFLE);
    unsigned lane = t % 32, first = t - lane;
    char what[160];
    if (first + 32 > block_threads) {
        snprintf(what, sizeof what, "a warp multiply-add of thread %u in a warp of fewer than 32 threads", t);
        record_fault(what);
        return;
    }
    for (unsigned l = 0; l < 32; l++) {
        if (fibers[first + l].shuffles < nth) {
            snprintf(what, sizeof what, "a warp multiply-add of thread %u that thread %u of its warp never reaches", t,
                     first + l);
            record_fault(what);
            return;
        }
    }
    auto tf32 = [](unsigned w) {
        w &= 0xffffe000u;
        float x;
        memcpy(&x, &w, 4);
        return x;
    };
    auto A = [&](unsigned row, unsigned k) { return tf32(mma_offered[p][first + row % 8 * 4 + k % 4][row / 8 + 2 * (k / 4)]); };
    auto B = [&](unsigned k, unsigned col) { return tf32(mma_offered[p][first + col * 4 + k % 4][4 + k / 4]); };
    unsigned group = lane / 4, quad = lane % 4;
    for (unsigned i = 0; i < 4; i++) {
        unsigned row = group + 8 * (i / 2), col = 2 * quad + i % 2;
        float acc = d[i];
        for (unsigned k = 0; k < 8; k++) acc += A(row, k) * B(k, col);
        d[i] = acc;
    }
}

template <class T> static T shuffle(T v, int src_lane, int width) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned t = current;
    Fiber& f = fibers[t];
    unsigned p = f.parity;
    f.parity ^= 1;
    memcpy(&offered[p][t], &v, sizeof(T));
    unsigned nth = ++f.shuffles;
    yield(AT_SHUFFLE);
    int lane = (int)(t % 32);
    int base = lane - lane % width;
    if (src_lane < base || src_lane >= base + width) return v;
    unsigned src = t - (unsigned)lane + (unsigned)src_lane;
    // Every lane of the mask (the whole warp) must take part, as on a GPU: a lane the block does
    // not have, or one that returned or waits elsewhere, would leave this one reading garbage.
    char what[160];
    if (src >= block_threads) {
        snprintf(what, sizeof what, "a warp shuffle of thread %u reads thread %u, past the block's %u", t, src,
                 block_threads);
        record_fault(what);
        return v;
    }
    if (fibers[src].shuffles < nth) {
        snprintf(what, sizeof what, "a warp shuffle of thread %u that thread %u of its warp never reaches", t, src);
        record_fault(what);
    }
    T r;
    memcpy(&r, &offered[p][src], sizeof(T));
    return r;
}

// The calling thread's slot in the asynchronous-copy tables, its state reset in a new block.
static unsigned async_thread() {
    unsigned t = threadIdx.x + blockDim.x * threadIdx.y;
    if (!async_copies) async_copies = new AsyncCopy[(size_t)MAX_THREADS * MAX_ASYNC_COPIES];
    if (async_epoch[t] != block_epoch) {
        async_epoch[t] = block_epoch;
        async_pending[t] = 0;
        async_committed[t] = 0;
    }
    return t;
}

static void check_async_copies_landed(unsigned n) {
    if (!async_copies) return;
    for (unsigned t = 0; t < n; t++) {
        if (async_epoch[t] == block_epoch && async_pending[t] > 0) {
            char what[200];
            snprintf(what, sizeof what,
                     "thread %u of block (%u, %u) ended with %u asynchronous copies it never waited for", t,
                     blockIdx.x, blockIdx.y, async_pending[t]);
            record_fault(what);
            async_pending[t] = 0;
        }
    }
}
}  // namespace kiln_emu

// The emulator's side of the prelude's cp.async helpers (inline PTX on a GPU).
static inline void kiln_emu_cp_async4(float* dst, const float* src, bool inside) {
    unsigned t = kiln_emu::async_thread();
    if (kiln_emu::async_pending[t] == kiln_emu::MAX_ASYNC_COPIES) {
        kiln_emu::record_fault("a thread issued more asynchronous copies than the emulator holds before waiting");
        return;
    }
    kiln_emu::async_copies[(size_t)t * kiln_emu::MAX_ASYNC_COPIES + kiln_emu::async_pending[t]++] =
        kiln_emu::AsyncCopy{dst, src, inside, kiln_emu::async_committed[t]};
    // Not there yet: what a GPU's shared memory holds until the copy lands is not the word.
    *dst = __uint_as_float(0xffffffffu);
}
// A 16-byte copy: four words, both addresses on a 16-byte boundary (a GPU faults otherwise).
static inline void kiln_emu_cp_async16(float* dst, const float* src, bool inside) {
    if (((uintptr_t)dst | (uintptr_t)src) & 15) {
        kiln_emu::record_fault("a 16-byte asynchronous copy from or to an address off a 16-byte boundary");
    }
    for (int i = 0; i < 4; i++) kiln_emu_cp_async4(dst + i, src + i, inside);
}
// The emulator's side of instructions that only order a GPU's grids (it runs one at a time).
static inline void kiln_emu_nothing() {}
static inline void kiln_emu_cp_async_commit() { kiln_emu::async_committed[kiln_emu::async_thread()]++; }
// cp.async.wait_group n: the copies of every committed group but the newest n land.
static inline void kiln_emu_cp_async_wait(int newest) {
    unsigned t = kiln_emu::async_thread();
    kiln_emu::AsyncCopy* mine = kiln_emu::async_copies + (size_t)t * kiln_emu::MAX_ASYNC_COPIES;
    unsigned committed = kiln_emu::async_committed[t], kept = 0;
    for (unsigned i = 0; i < kiln_emu::async_pending[t]; i++) {
        kiln_emu::AsyncCopy c = mine[i];
        if (c.group + (unsigned)newest < committed) {
            *c.dst = c.inside ? *c.src : 0.0f;
        } else {
            mine[kept++] = c;
        }
    }
    kiln_emu::async_pending[t] = kept;
}


// Undefined behaviour a GPU would not forgive: kernels are compiled with UBSan checks (alignment,
// array bounds, shifts, signed overflow, division by zero) whose handlers are these rather than
// libubsan's. A handler records the first fault of the launch (where in kiln-module.cu, and what),
// which the entry point hands back to the emulator as an error naming the kernel; the access goes
// on meanwhile (an x86 core forgives a misaligned load), except a division by zero, which would trap.
namespace kiln_emu {
struct SourceLocation {
    const char* file;
    unsigned line, column;
};
struct TypeDescriptor {
    unsigned short kind, info;
    char name[1];
};
// Every check's data starts with its location; a type check's goes on with the type and alignment.
struct TypeMismatch {
    SourceLocation at;
    const TypeDescriptor* type;
    unsigned char log_alignment, check_kind;
};
static void record(const SourceLocation* at, const char* what) {
    char where[512];
    snprintf(where, sizeof where, "%s:%u:%u: undefined behaviour: %s", at->file, at->line, at->column, what);
    record_fault(where);
}
}  // namespace kiln_emu

#define KILN_UB_HANDLER(name, params, what)                                          \
    extern "C" void __ubsan_handle_##name params { kiln_emu::record((const kiln_emu::SourceLocation*)data, what); } \
    extern "C" void __ubsan_handle_##name##_abort params { kiln_emu::record((const kiln_emu::SourceLocation*)data, what); }
KILN_UB_HANDLER(out_of_bounds, (void* data, void*), "array index out of bounds")
KILN_UB_HANDLER(shift_out_of_bounds, (void* data, void*, void*), "shift out of range")
KILN_UB_HANDLER(add_overflow, (void* data, void*, void*), "signed integer overflow in +")
KILN_UB_HANDLER(sub_overflow, (void* data, void*, void*), "signed integer overflow in -")
KILN_UB_HANDLER(mul_overflow, (void* data, void*, void*), "signed integer overflow in *")
KILN_UB_HANDLER(negate_overflow, (void* data, void*), "signed integer overflow in unary -")
KILN_UB_HANDLER(vla_bound_not_positive, (void* data, void*), "array of non-positive length")
#undef KILN_UB_HANDLER
static void kiln_emu_type_mismatch(void* data, void* pointer) {
    const kiln_emu::TypeMismatch* d = (const kiln_emu::TypeMismatch*)data;
    char what[160];
    uintptr_t align = (uintptr_t)1 << d->log_alignment;
    if (!pointer)
        snprintf(what, sizeof what, "access through a null pointer to %s", d->type->name);
    else
        snprintf(what, sizeof what, "access to %s at an address %zu bytes past a %zu-byte boundary (GPUs fault on it)",
                 d->type->name, (size_t)((uintptr_t)pointer % align), (size_t)align);
    kiln_emu::record(&d->at, what);
}
extern "C" void __ubsan_handle_type_mismatch_v1(void* data, void* pointer) { kiln_emu_type_mismatch(data, pointer); }
extern "C" void __ubsan_handle_type_mismatch_v1_abort(void* data, void* pointer) {
    kiln_emu_type_mismatch(data, pointer);
}
static void kiln_emu_divrem(void* data) {
    kiln_emu::record((const kiln_emu::SourceLocation*)data, "integer division by zero or overflow");
    fprintf(stderr, "kiln CUDA emulator: %s\n", kiln_emu::fault);
    abort();
}
extern "C" void __ubsan_handle_divrem_overflow(void* data, void*, void*) { kiln_emu_divrem(data); }
extern "C" void __ubsan_handle_divrem_overflow_abort(void* data, void*, void*) { kiln_emu_divrem(data); }

// The race check's element in a shared array: the array's element size up to 4 bytes (so threads
// may each write a `bool` of their own); 4 bytes in a union of kernels' arrays (whose members'
// types differ).
namespace kiln_emu {
template <class T, size_t N> constexpr unsigned shared_granule(T (&)[N]) { return sizeof(T) < 4 ? sizeof(T) : 4; }
template <class T> constexpr unsigned shared_granule(T&) { return 4; }
}  // namespace kiln_emu
#define KILN_EMU_SHARED(name) \
    kiln_emu::poison_once((void*)&(name), sizeof(name), #name, kiln_emu::shared_granule(name))

namespace kiln_emu {
static inline void sync_at(unsigned line) {
    if (in_fibers) {
        fibers[current].sync_line = line;
        fibers[current].barriers++;
    }
    yield(AT_SYNC);
}
}  // namespace kiln_emu
// Where each thread waits, so that threads at different barriers are a fault.
#define __syncthreads() kiln_emu::sync_at(__LINE__)
template <class T> static inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = (int)(kiln_emu::current % 32);
    return kiln_emu::shuffle(v, lane + (int)delta, width);
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = (int)(kiln_emu::current % 32);
    return kiln_emu::shuffle(v, lane ^ mask, width);
}
// The emulator's side of cvt.rn.tf32.f32 (compute capability 9.0): x rounded to the nearest TF32,
// ties to even, its low 13 bits zero; past the largest TF32 an infinity; a NaN a NaN.
static inline void kiln_emu_cvt_rn_tf32(unsigned& out, float x) {
    unsigned bits;
    memcpy(&bits, &x, sizeof bits);
    out = isnan(x) ? 0x7fffffffu : (bits + 0xfffu + ((bits >> 13) & 1u)) & 0xffffe000u;
}
// The emulator's side of the prelude's kiln_mma_tf32 (inline PTX on a GPU).
static inline void kiln_emu_mma_tf32(float& d0, float& d1, float& d2, float& d3, unsigned a0, unsigned a1, unsigned a2,
                                     unsigned a3, unsigned b0, unsigned b1) {
    float d[4] = {d0, d1, d2, d3};
    const unsigned a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    kiln_emu::mma_tf32(d, a, b);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}

// An L2 load (what the last block of a ticket reads other blocks' results with); the race check
// sees it as the one kind of load that may read another block's writes of the same launch.
template <class T> static inline T __ldcg(const T* p) {
    kiln_emu::race_mark(true, false);
    T v = *p;
    kiln_emu::race_mark(false, false);
    return v;
}
static inline void __threadfence() { kiln_emu::race_fence(); }
// CUDA's overloads (arguments convert to the pointee's type, as there). Atomics are plain
// read-modify-writes (one OS thread runs a launch), marked as atomic for the race check.
#define KILN_ATOMIC_ADD(T)                          \
    static inline T atomicAdd(T* p, T v) {          \
        kiln_emu::race_mark(false, true);           \
        T old = *p;                                 \
        *p = old + v;                               \
        kiln_emu::race_mark(false, false);          \
        return old;                                 \
    }
KILN_ATOMIC_ADD(int)
KILN_ATOMIC_ADD(unsigned)
KILN_ATOMIC_ADD(unsigned long long)
KILN_ATOMIC_ADD(float)
KILN_ATOMIC_ADD(double)
#undef KILN_ATOMIC_ADD
static inline unsigned atomicMin(unsigned* p, unsigned v) {
    kiln_emu::race_mark(false, true);
    unsigned old = *p;
    if (v < old) *p = v;
    kiln_emu::race_mark(false, false);
    return old;
}
