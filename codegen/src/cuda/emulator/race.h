// kiln's CUDA emulator, its race check: included after shim.h in every unit. Where
// KILN_EMU_RACECHECK is not defined, it only defines the shim's calls into the check as nothing.
namespace kiln_emu {
// The race check (units compiled with KILN_EMU_RACECHECK defined, and with the compiler's thread
// sanitizer instrumentation, whose calls on every load and store land in the hooks below rather
// than in a sanitizer runtime). It checks CUDA's rules, not the order this emulator happens to run
// in: two accesses to one element, at least one a write, by different threads, conflict unless
//   - both threads are of one block and a __syncthreads lies between them, or
//   - they are of different blocks, the write came first and was published (the writing thread
//     ran __threadfence after it), and the read is an L2 load (__ldcg) by a block that took a
//     ticket first (an atomicAdd by the reading thread, or by any thread of its block before a
//     barrier): the last-block protocol of kiln's sliced products and split rows; or
//   - both are atomics (a plain access to an element other blocks changed atomically is allowed
//     once the block took its ticket: the last block resetting the counter); or
//   - they are of different blocks of one cluster, in the writer's shared memory, the read a
//     distributed shared memory load, and a cluster barrier lies between them.
// Shared arrays are checked per block, the launch's buffers per launch (kernel boundaries order
// everything); the first conflict is the launch's fault. Elements are the buffer's element size
// (in shared memory, the array's element size up to 4 bytes; a union's elements are 4 bytes).
#ifdef KILN_EMU_RACECHECK
struct RaceRecord {
    unsigned writer, writer_barriers, writer_fences, writer_cluster_barriers;
    unsigned reader, reader_barriers, reader_block;
    unsigned char flags;
};
enum : unsigned char { WRITTEN = 1, WRITTEN_ATOMICALLY = 2, READ = 4, READ_BY_MANY = 8, READ_BY_BLOCKS = 16 };
struct RaceRegion {
    uintptr_t lo, hi;
    unsigned granule;
    bool shared;
    char name[48];
    RaceRecord* records;
};
// The running thread: its place in the launch (block-major), its block, the barriers it passed.
struct RaceThread {
    unsigned id, block, barriers, cluster_barriers;
};
// What a page of memory holds: one region throughout (its index), none (NO_REGION), or both
// (MIXED: look it up). Accesses outside every region (the kernel's locals, CUDA's built-in
// variables) are most of them, so they must be cheap to pass over.
const int NO_REGION = -1, MIXED = -2;
struct PageHint {
    uintptr_t page;
    unsigned generation;
    int region;
};
const unsigned MAX_RACE_REGIONS = 256, PAGE_HINTS = 4096;
// Everything the hooks need, in one thread-local object (each thread-local a hook reads is a
// call into the dynamic loader in a shared library).
struct RaceState {
    RaceRegion regions[MAX_RACE_REGIONS];
    unsigned region_count, generation;
    PageHint hints[PAGE_HINTS];
    RaceThread me;
    bool coherent_load, atomic_access, cluster_load;
    // Per thread of the launch: its __threadfence count, and whether it did an atomic.
    unsigned* fences;
    unsigned char* took_ticket;
    // Per block: the fewest barriers any of its threads had passed at an atomic (~0u: none yet).
    unsigned* ticket_barriers;
    size_t capacity_threads, capacity_blocks;
};
static thread_local RaceState* race = nullptr;

KILN_EMU_UNCHECKED static RaceState& race_state() {
    if (!race) {
        race = (RaceState*)calloc(1, sizeof(RaceState));
        if (!race) fail("out of memory for the race check");
    }
    return *race;
}

KILN_EMU_UNCHECKED static void race_add(const char* name, void* at, size_t bytes, unsigned granule, bool shared) {
    RaceState& s = race_state();
    if (s.region_count == MAX_RACE_REGIONS) fail("more than 256 memory regions in one launch");
    RaceRegion& r = s.regions[s.region_count++];
    r.lo = (uintptr_t)at;
    r.hi = r.lo + bytes;
    r.granule = granule ? granule : 1;
    r.shared = shared;
    snprintf(r.name, sizeof r.name, "%s", name);
    r.records = (RaceRecord*)calloc(bytes / r.granule + 1, sizeof(RaceRecord));
    if (!r.records) fail("out of memory for the race check's records");
    s.generation++;
}

KILN_EMU_UNCHECKED static void race_drop_regions() {
    RaceState& s = race_state();
    for (unsigned i = 0; i < s.region_count; i++) free(s.regions[i].records);
    s.region_count = 0;
    s.generation++;
}

KILN_EMU_UNCHECKED static void race_shared(const char* name, void* at, size_t bytes, unsigned granule) {
    RaceState& s = race_state();
    for (unsigned i = 0; i < s.region_count; i++) {
        RaceRegion& r = s.regions[i];
        if (r.lo == (uintptr_t)at && r.shared) {
            memset(r.records, 0, (bytes / r.granule + 1) * sizeof(RaceRecord));
            return;
        }
    }
    race_add(name, at, bytes, granule, true);
}

KILN_EMU_UNCHECKED static void race_launch(size_t blocks, size_t threads_per_block) {
    RaceState& s = race_state();
    size_t threads = blocks * threads_per_block;
    if (threads > s.capacity_threads) {
        free(s.fences);
        free(s.took_ticket);
        s.fences = (unsigned*)malloc(threads * sizeof(unsigned));
        s.took_ticket = (unsigned char*)malloc(threads);
        s.capacity_threads = threads;
    }
    if (blocks > s.capacity_blocks) {
        free(s.ticket_barriers);
        s.ticket_barriers = (unsigned*)malloc(blocks * sizeof(unsigned));
        s.capacity_blocks = blocks;
    }
    if (!s.fences || !s.took_ticket || !s.ticket_barriers) fail("out of memory for the race check");
    memset(s.fences, 0, threads * sizeof(unsigned));
    memset(s.took_ticket, 0, threads);
    memset(s.ticket_barriers, 0xff, blocks * sizeof(unsigned));
}

// Called whenever the emulator (re)enters thread t of the current block.
KILN_EMU_UNCHECKED static void race_enter(unsigned t, unsigned barriers) {
    unsigned per_block = blockDim.x * blockDim.y, b = blockIdx.x + blockIdx.y * gridDim.x;
    race_state().me = RaceThread{b * per_block + t, b, barriers};
}

KILN_EMU_UNCHECKED static void race_enter_cluster(unsigned cluster_barriers) {
    race_state().me.cluster_barriers = cluster_barriers;
}

// A cluster's blocks run on threads of their own, checked as one launch: they share the state of
// the thread that launched them.
KILN_EMU_UNCHECKED static void* race_current() { return &race_state(); }
KILN_EMU_UNCHECKED static void race_adopt(void* state) { race = (RaceState*)state; }

// A cluster's shared arrays, dropped when it ends (its blocks' threads and their arrays are gone).
KILN_EMU_UNCHECKED static void race_forget_shared() {
    RaceState& s = race_state();
    unsigned kept = 0;
    for (unsigned i = 0; i < s.region_count; i++) {
        if (s.regions[i].shared)
            free(s.regions[i].records);
        else
            s.regions[kept++] = s.regions[i];
    }
    s.region_count = kept;
    s.generation++;
}

KILN_EMU_UNCHECKED static void race_mark_cluster(bool cluster_load) { race_state().cluster_load = cluster_load; }

KILN_EMU_UNCHECKED static void race_fence() {
    RaceState& s = race_state();
    s.fences[s.me.id]++;
}
KILN_EMU_UNCHECKED static void race_mark(bool coherent_load, bool atomic_access) {
    RaceState& s = race_state();
    s.coherent_load = coherent_load;
    s.atomic_access = atomic_access;
}

KILN_EMU_UNCHECKED static bool took_ticket(const RaceState& s) {
    return s.took_ticket[s.me.id] || s.ticket_barriers[s.me.block] < s.me.barriers;
}

KILN_EMU_UNCHECKED static void describe(char* out, size_t n, unsigned id) {
    unsigned per_block = blockDim.x * blockDim.y, b = id / per_block, t = id % per_block;
    snprintf(out, n, "thread (%u, %u) of block (%u, %u)", t % blockDim.x, t / blockDim.x, b % gridDim.x,
             b / gridDim.x);
}

KILN_EMU_UNCHECKED static void race_fault(const RaceRegion& r, size_t element, unsigned me, const char* access,
                                          unsigned other, const char* other_access, const char* why) {
    char mine[64], theirs[64], what[400];
    describe(mine, sizeof mine, me);
    describe(theirs, sizeof theirs, other);
    snprintf(what, sizeof what, "race on %s%s[%zu] (%u-byte elements): %s %s it, which %s %s, %s",
             r.shared ? "shared array " : "", r.name, element, r.granule, mine, access, theirs, other_access, why);
    record_fault(what);
}

enum RaceAccess { LOAD, STORE, ATOMIC };

KILN_EMU_UNCHECKED static void race_check(RaceState& s, RaceRegion& r, size_t g, RaceAccess kind) {
    RaceRecord& c = r.records[g];
    const RaceThread& me = s.me;
    const char* access = kind == LOAD ? "reads" : kind == STORE ? "writes" : "atomically updates";
    if ((c.flags & WRITTEN) && c.writer != me.id) {
        unsigned per_block = blockDim.x * blockDim.y;
        const char* wrote = c.flags & WRITTEN_ATOMICALLY ? "atomically updated" : "wrote";
        if (c.writer / per_block == me.block) {
            if (c.writer_barriers == me.barriers)
                race_fault(r, g, me.id, access, c.writer, wrote, "with no __syncthreads between");
        } else if (r.shared) {
            if (kind != LOAD || !s.cluster_load)
                race_fault(r, g, me.id, access, c.writer, wrote, "in another block's shared memory");
            else if (c.writer_cluster_barriers == me.cluster_barriers)
                race_fault(r, g, me.id, access, c.writer, wrote, "in another block of the cluster, with no cluster barrier between");
        } else if (kind == ATOMIC) {
            if (!(c.flags & WRITTEN_ATOMICALLY))
                race_fault(r, g, me.id, access, c.writer, wrote, "in another block of the same launch");
        } else if (c.flags & WRITTEN_ATOMICALLY) {
            if (!took_ticket(s))
                race_fault(r, g, me.id, access, c.writer, wrote, "in another block, before this block took its ticket");
        } else if (kind == STORE) {
            race_fault(r, g, me.id, access, c.writer, wrote, "in another block of the same launch");
        } else if (!s.coherent_load) {
            race_fault(r, g, me.id, access, c.writer, wrote,
                       "in another block of the same launch, and reads it not from L2 (__ldcg)");
        } else if (s.fences[c.writer] <= c.writer_fences) {
            race_fault(r, g, me.id, access, c.writer, wrote,
                       "in another block and did not publish (__threadfence after the write)");
        } else if (!took_ticket(s)) {
            race_fault(r, g, me.id, access, c.writer, wrote,
                       "in another block, and this block took no ticket (atomicAdd) first");
        }
    }
    if (kind != LOAD && (c.flags & READ)) {
        if ((c.flags & READ_BY_BLOCKS) || c.reader_block != me.block)
            race_fault(r, g, me.id, access, c.reader, "read", "in another block of the same launch");
        else if (c.reader_barriers == me.barriers && ((c.flags & READ_BY_MANY) || c.reader != me.id))
            race_fault(r, g, me.id, access, c.reader, "read", "with no __syncthreads between");
    }
    if (kind == LOAD) {
        if (!(c.flags & READ) || c.reader_block != me.block) {
            if ((c.flags & READ) && c.reader_block != me.block) c.flags |= READ_BY_BLOCKS;
            c.flags = (c.flags | READ) & ~READ_BY_MANY;
            c.reader = me.id, c.reader_barriers = me.barriers, c.reader_block = me.block;
        } else if (c.reader_barriers == me.barriers) {
            if (c.reader != me.id) c.flags |= READ_BY_MANY;
        } else {
            c.flags &= ~READ_BY_MANY;
            c.reader = me.id, c.reader_barriers = me.barriers;
        }
    } else {
        c.flags = (c.flags | WRITTEN) & ~WRITTEN_ATOMICALLY;
        if (kind == ATOMIC) {
            c.flags |= WRITTEN_ATOMICALLY;
            s.took_ticket[me.id] = 1;
            if (me.barriers < s.ticket_barriers[me.block]) s.ticket_barriers[me.block] = me.barriers;
        }
        c.writer = me.id, c.writer_barriers = me.barriers, c.writer_fences = s.fences[me.id];
        c.writer_cluster_barriers = me.cluster_barriers;
    }
}

// The region holding address a, or NO_REGION.
KILN_EMU_UNCHECKED static int race_region_of(RaceState& s, uintptr_t a) {
    uintptr_t page = a >> 12;
    PageHint& h = s.hints[page % PAGE_HINTS];
    if (h.page != page || h.generation != s.generation) {
        uintptr_t lo = page << 12, hi = lo + 4096;
        int found = NO_REGION;
        for (unsigned i = 0; i < s.region_count; i++) {
            const RaceRegion& r = s.regions[i];
            if (r.hi <= lo || r.lo >= hi) continue;
            found = found == NO_REGION && r.lo <= lo && r.hi >= hi ? (int)i : MIXED;
            if (found == MIXED) break;
        }
        h = PageHint{page, s.generation, found};
    }
    if (h.region != MIXED) return h.region;
    for (unsigned i = 0; i < s.region_count; i++)
        if (a >= s.regions[i].lo && a < s.regions[i].hi) return (int)i;
    return NO_REGION;
}

KILN_EMU_UNCHECKED static void race_access(const void* at, size_t size, bool store) {
    if (!race || !race->region_count || size == 0) return;
    RaceState& s = *race;
    uintptr_t a = (uintptr_t)at;
    int i = race_region_of(s, a);
    if (i == NO_REGION) return;
    // The read half of an atomic read-modify-write is checked with its write.
    if (s.atomic_access && !store) return;
    RaceRegion& r = s.regions[i];
    uintptr_t end = a + size < r.hi ? a + size : r.hi;
    RaceAccess kind = s.atomic_access ? ATOMIC : store ? STORE : LOAD;
    for (size_t g = (a - r.lo) / r.granule; g <= (end - 1 - r.lo) / r.granule; g++) race_check(s, r, g, kind);
}
#else
static inline void race_shared(const char*, void*, size_t, unsigned) {}
static inline void race_launch(size_t, size_t) {}
static inline void race_enter(unsigned, unsigned) {}
static inline void race_fence() {}
static inline void race_mark(bool, bool) {}
static inline void race_mark_cluster(bool) {}
static inline void race_enter_cluster(unsigned) {}
static inline void* race_current() { return nullptr; }
static inline void race_adopt(void*) {}
static inline void race_forget_shared() {}
#endif
}  // namespace kiln_emu

#ifdef KILN_EMU_RACECHECK
// The thread sanitizer's instrumentation calls, answered by the race check (no sanitizer runtime).
#define KILN_RACE_HOOK(n)                                                                                          \
    extern "C" KILN_EMU_UNCHECKED void __tsan_read##n(void* p) { kiln_emu::race_access(p, n, false); }            \
    extern "C" KILN_EMU_UNCHECKED void __tsan_write##n(void* p) { kiln_emu::race_access(p, n, true); }            \
    extern "C" KILN_EMU_UNCHECKED void __tsan_unaligned_read##n(void* p) { kiln_emu::race_access(p, n, false); }  \
    extern "C" KILN_EMU_UNCHECKED void __tsan_unaligned_write##n(void* p) { kiln_emu::race_access(p, n, true); }
KILN_RACE_HOOK(1)
KILN_RACE_HOOK(2)
KILN_RACE_HOOK(4)
KILN_RACE_HOOK(8)
KILN_RACE_HOOK(16)
#undef KILN_RACE_HOOK
extern "C" KILN_EMU_UNCHECKED void __tsan_read_range(void* p, unsigned long n) { kiln_emu::race_access(p, n, false); }
extern "C" KILN_EMU_UNCHECKED void __tsan_write_range(void* p, unsigned long n) { kiln_emu::race_access(p, n, true); }
extern "C" KILN_EMU_UNCHECKED void __tsan_func_entry(void*) {}
extern "C" KILN_EMU_UNCHECKED void __tsan_func_exit() {}
extern "C" KILN_EMU_UNCHECKED void __tsan_init() {}
// The launch's buffers, named as the kernel's parameters, before each launch. The last launch's
// regions are dropped, its shared arrays too: a block registers those when it first reaches them.
// What the last launch did to the buffer at `at`: its maximal runs of elements it only read (kind
// 1) or wrote (kind 2), as (first byte, end byte, kind) triples in `out` (room for `cap` triples).
// Returns the number of runs (more than `cap`: call again with that room).
extern "C" __attribute__((visibility("default"))) KILN_EMU_UNCHECKED size_t kiln_emu_race_runs(const void* at,
                                                                                            size_t* out, size_t cap) {
    kiln_emu::RaceState& s = kiln_emu::race_state();
    for (unsigned i = 0; i < s.region_count; i++) {
        const kiln_emu::RaceRegion& r = s.regions[i];
        if (r.shared || r.lo != (uintptr_t)at) continue;
        size_t runs = 0, bytes = r.hi - r.lo, granules = (bytes + r.granule - 1) / r.granule;
        unsigned open = 0;
        size_t first = 0;
        for (size_t g = 0; g <= granules; g++) {
            unsigned char f = g < granules ? r.records[g].flags : 0;
            unsigned kind = f & kiln_emu::WRITTEN ? 2 : f & kiln_emu::READ ? 1 : 0;
            if (kind == open) continue;
            if (open) {
                if (runs < cap) {
                    size_t end = g * r.granule < bytes ? g * r.granule : bytes;
                    out[3 * runs] = first, out[3 * runs + 1] = end, out[3 * runs + 2] = open;
                }
                runs++;
            }
            open = kind;
            first = g * r.granule;
        }
        return runs;
    }
    return 0;
}
extern "C" __attribute__((visibility("default"))) KILN_EMU_UNCHECKED void kiln_emu_race_buffers(
    unsigned n, const char* const* names, void* const* at, const size_t* bytes, const unsigned* element_bytes) {
    kiln_emu::race_drop_regions();
    // A buffer passed twice (an update in place, or two buffers sharing memory) is one region: as
    // long as the longest, in the smallest elements.
    for (unsigned i = 0; i < n; i++) {
        bool seen = false;
        size_t longest = bytes[i];
        unsigned smallest = element_bytes[i];
        for (unsigned j = 0; j < n; j++) {
            if (at[j] != at[i]) continue;
            seen |= j < i;
            longest = bytes[j] > longest ? bytes[j] : longest;
            smallest = element_bytes[j] < smallest ? element_bytes[j] : smallest;
        }
        if (!seen && at[i] && longest) kiln_emu::race_add(names[i], at[i], longest, smallest, false);
    }
}
#endif
