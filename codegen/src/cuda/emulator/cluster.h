// kiln's CUDA emulator, its thread block clusters: included after shim.h (whose launch runs a
// clustered kernel's launch here) and before race.h in every unit.
namespace kiln_emu {
// Thread block clusters (`__cluster_dims__`): the blocks of a cluster read each other's shared
// memory and wait for each other at cluster barriers, so they are alive together: each runs on an
// OS thread of its own (its `__shared__` arrays, thread_local, its own), and a baton lets one run
// at a time, in the launch's block order, passed on when the running block waits at a cluster
// barrier or ends; a barrier completes when every block of the cluster waits at it. So a launch
// still runs one block at a time (atomics stay plain read-modify-writes), and a block that ends
// while the others wait at a barrier is a fault (a hang on a GPU).
const unsigned MAX_CLUSTER = 16;
struct ClusterArray {
    char* at;
    size_t bytes;
    const char* name;
};
struct ClusterRun {
    pthread_mutex_t lock;
    pthread_cond_t turn_changed;
    unsigned size, first_block;
    // The blocks' ranks in running order, and the place in it of the one that runs.
    unsigned order[MAX_CLUSTER], turn;
    bool done[MAX_CLUSTER], waiting[MAX_CLUSTER];
    unsigned long long generation;
    // Each block's shared arrays, in the order it first reached them.
    ClusterArray arrays[MAX_CLUSTER][MAX_POISONED];
    unsigned array_count[MAX_CLUSTER];
    char fault[512];
    // The launch, as each block's thread needs it.
    kiln_uint3 grid, block;
    bool mirrored, barriers;
    Body fn;
    void** args;
    void* race;
};
static thread_local ClusterRun* cluster = nullptr;
static thread_local unsigned cluster_rank = 0;

// Hands the baton to the next block in order that can run (lock held). With none, every block left
// waits at the barrier: it completes (a fault if a block ended without reaching it).
KILN_EMU_UNCHECKED static void cluster_pass(ClusterRun& run) {
    for (unsigned i = 1; i <= run.size; i++) {
        unsigned at = (run.turn + i) % run.size, r = run.order[at];
        if (!run.done[r] && !run.waiting[r]) {
            run.turn = at;
            return;
        }
    }
    bool any_waiting = false;
    for (unsigned r = 0; r < run.size; r++) any_waiting |= run.waiting[r];
    if (!any_waiting) return;
    for (unsigned r = 0; r < run.size; r++) {
        if (run.done[r] && !run.fault[0])
            snprintf(run.fault, sizeof run.fault, "a cluster barrier that block (%u, 0) never reaches",
                     run.first_block + r);
        run.waiting[r] = false;
    }
    run.generation++;
    for (unsigned at = 0; at < run.size; at++) {
        if (!run.done[run.order[at]]) {
            run.turn = at;
            return;
        }
    }
}

// The running block's threads all wait at a cluster barrier: the block waits for the others.
KILN_EMU_UNCHECKED static void cluster_wait() {
    if (!cluster) return;  // a launch without clusters: a block barrier
    ClusterRun& run = *cluster;
    pthread_mutex_lock(&run.lock);
    run.waiting[cluster_rank] = true;
    unsigned long long generation = run.generation;
    cluster_pass(run);
    pthread_cond_broadcast(&run.turn_changed);
    while (run.generation == generation || run.order[run.turn] != cluster_rank)
        pthread_cond_wait(&run.turn_changed, &run.lock);
    pthread_mutex_unlock(&run.lock);
}

// The running block reached the declaration of a shared array: its place, for the others' reads.
KILN_EMU_UNCHECKED static void cluster_register(void* at, size_t bytes, const char* name) {
    if (!cluster) return;
    unsigned& count = cluster->array_count[cluster_rank];
    if (count == MAX_POISONED) fail("more shared arrays in a clustered block than the emulator holds");
    cluster->arrays[cluster_rank][count++] = ClusterArray{(char*)at, bytes, name};
}

// Where `at`, a place in the calling block's shared memory, is in block `rank`'s (mapa).
KILN_EMU_UNCHECKED static const float* cluster_address(const float* at, unsigned rank) {
    if (!cluster) {
        if (rank != 0) record_fault("a read of another block's shared memory in a launch without clusters");
        return at;
    }
    if (rank >= cluster->size) {
        record_fault("a read of the shared memory of a block outside the cluster");
        return at;
    }
    if (cluster->done[rank]) {
        record_fault("a read of the shared memory of a block of the cluster that has ended (a cluster barrier missing)");
        return at;
    }
    const char* p = (const char*)at;
    for (unsigned i = 0; i < cluster->array_count[cluster_rank]; i++) {
        const ClusterArray& mine = cluster->arrays[cluster_rank][i];
        if (p < mine.at || p + sizeof(float) > mine.at + mine.bytes) continue;
        for (unsigned j = 0; j < cluster->array_count[rank]; j++) {
            const ClusterArray& theirs = cluster->arrays[rank][j];
            if (strcmp(theirs.name, mine.name) == 0) return (const float*)(theirs.at + (p - mine.at));
        }
        record_fault("a read of a shared array that the cluster's other block has not reached");
        return at;
    }
    record_fault("a read of distributed shared memory outside every shared array");
    return at;
}

// What a block's OS thread allocated for its fibers, freed as it ends.
KILN_EMU_UNCHECKED static void release_thread_state() {
    delete[] fibers;
    delete[] stacks;
    delete[] async_copies;
    fibers = nullptr;
    stacks = nullptr;
    async_copies = nullptr;
}

struct ClusterBlock {
    ClusterRun* run;
    unsigned rank;
};

KILN_EMU_UNCHECKED static void* run_cluster_block(void* arg) {
    ClusterBlock* me = (ClusterBlock*)arg;
    ClusterRun& run = *me->run;
    cluster = &run;
    cluster_rank = me->rank;
    gridDim = run.grid;
    blockDim = run.block;
    mirrored = run.mirrored;
    race_adopt(run.race);
    blockIdx = kiln_uint3{run.first_block + me->rank, 0, 0};
    pthread_mutex_lock(&run.lock);
    while (run.order[run.turn] != me->rank) pthread_cond_wait(&run.turn_changed, &run.lock);
    pthread_mutex_unlock(&run.lock);
    run_block(run.block.x, run.block.y, run.barriers, run.fn, run.args);
    pthread_mutex_lock(&run.lock);
    run.done[me->rank] = true;
    if (fault[0] && !run.fault[0]) snprintf(run.fault, sizeof run.fault, "%s", fault);
    cluster_pass(run);
    pthread_cond_broadcast(&run.turn_changed);
    pthread_mutex_unlock(&run.lock);
    release_thread_state();
    return nullptr;
}

// Runs the blocks of cluster `c` (of `size` blocks along x), each on a thread of its own.
KILN_EMU_UNCHECKED static void run_cluster(unsigned c, unsigned size, bool barriers, Body fn, void** args) {
    ClusterRun* run = new ClusterRun();
    pthread_mutex_init(&run->lock, nullptr);
    pthread_cond_init(&run->turn_changed, nullptr);
    run->size = size;
    run->first_block = c * size;
    for (unsigned i = 0; i < size; i++) run->order[i] = mirrored ? i : size - 1 - i;
    run->grid = gridDim;
    run->block = blockDim;
    run->mirrored = mirrored;
    run->barriers = barriers;
    run->fn = fn;
    run->args = args;
    run->race = race_current();
    pthread_t threads[MAX_CLUSTER];
    ClusterBlock blocks[MAX_CLUSTER];
    for (unsigned r = 0; r < size; r++) {
        blocks[r] = ClusterBlock{run, r};
        if (pthread_create(&threads[r], nullptr, run_cluster_block, &blocks[r]) != 0)
            fail("no thread for a block of a cluster");
    }
    for (unsigned r = 0; r < size; r++) pthread_join(threads[r], nullptr);
    if (run->fault[0]) record_fault(run->fault);
    race_forget_shared();
    pthread_cond_destroy(&run->turn_changed);
    pthread_mutex_destroy(&run->lock);
    delete run;
}

// Runs a clustered launch (`size` blocks a cluster along x), cluster by cluster.
static void launch_clusters(unsigned size, bool barriers, Body fn, void** args) {
    if (gridDim.y != 1 || gridDim.x % size != 0 || size > MAX_CLUSTER)
        fail("a clustered launch whose grid is not whole clusters along x");
    unsigned clusters = gridDim.x / size;
    for (unsigned i = 0; i < clusters; i++) run_cluster(mirrored ? i : clusters - 1 - i, size, barriers, fn, args);
}
}  // namespace kiln_emu

// The emulator's side of the prelude's cluster helpers (inline PTX on a GPU). A cluster barrier is
// also a block barrier; its threads' "line" is the count of cluster barriers they passed.
static inline void kiln_emu_cluster_sync() {
    if (kiln_emu::in_fibers) {
        kiln_emu::Fiber& f = kiln_emu::fibers[kiln_emu::current];
        f.barriers++;
        f.cluster_barriers++;
        f.sync_line = 0x80000000u + f.cluster_barriers;
        f.at_cluster = true;
    }
    kiln_emu::yield(kiln_emu::AT_SYNC);
}
static inline void kiln_emu_cluster_load(float& value, const float* at, unsigned rank) {
    const float* there = kiln_emu::cluster_address(at, rank);
    kiln_emu::race_mark_cluster(true);
    value = *there;
    kiln_emu::race_mark_cluster(false);
}
