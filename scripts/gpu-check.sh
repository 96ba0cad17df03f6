#!/usr/bin/env bash
# kiln's GPU checks, for a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu-check.sh --build   (on the development machine) builds the release test binaries
#                                  that exercise Device::Cuda and the step benchmark, strips them
#                                  and packs them into .gpu/bundle.tgz (git-ignored; carry that
#                                  folder: ~25 MB, where the loose binaries are over 64 MiB).
#   scripts/gpu-check.sh           (on the GPU machine, in the repository root) runs them and
#                                  prints a table: each test binary's result, then the benchmark
#                                  on the GPU (cold NVRTC compile, then from the disk cache,
#                                  then with the next slab through registers rather than copied
#                                  asynchronously into three buffers, KILN_CUDA_STAGES=1, and
#                                  into as many as fit of 8, KILN_CUDA_STAGES=8, with
#                                  32x32 tiles without thread groups, KILN_CUDA_K_GROUPS=0, with
#                                  programmatic dependent launch, KILN_CUDA_PDL=1, the next
#                                  kernel let launch at the end of each block, KILN_CUDA_PDL=late,
#                                  dependent launch with eight buffers, a sliced tile's partial
#                                  tiles through scratch memory and a ticket rather than in a thread
#                                  block cluster, KILN_CUDA_CLUSTERS=0, with neither default
#                                  (as before 2026-11-28), and with a short-row reduction (the
#                                  loss's row pass) as a kernel of its own rather than at the end
#                                  of the product it reduces, KILN_CUDA_ROW_TAIL=0, with cuBLAS's
#                                  products through cuBLASLt (algorithms timed, bias and ReLU
#                                  epilogues fused), KILN_CUDA_LT=1, with a side-by-side kernel's sections in step
#                                  order rather than the longest first, KILN_CUDA_LONGEST_FIRST=0,
#                                  with its clustered sections first and joining only where
#                                  they start on a cluster's first block in step order,
#                                  KILN_CUDA_CLUSTERS_FIRST=1,
#                                  with kernels joined from 12 steps on, not 64,
#                                  KILN_CUDA_LOOKAHEAD=12, with launches joining kernels the step
#                                  waits for even where they hold them up,
#                                  KILN_CUDA_CHAIN_JOINS=1, with every stream at one priority,
#                                  KILN_CUDA_PRIORITY=0, with slabs copied a word at a time
#                                  where they could go 16 bytes at a time,
#                                  KILN_CUDA_QUAD_COPIES=0, with unsliced tiles' slabs at their
#                                  shape's depth rather than twice it,
#                                  KILN_CUDA_DEEP_SLABS=0, with each returned output copied
#                                  back on its own and the error word cleared inside the step,
#                                  KILN_CUDA_EGRESS=0, with the slice count nearest to the one
#                                  the tiling rule wants, KILN_CUDA_NEAREST_SLICES=1, with
#                                  the FMA tiles' slab loops in passes of turns,
#                                  KILN_CUDA_TURN_PASSES=1, then each step
#                                  autotuned,
#                                  Function::autotune, at most
#                                  AUTOTUNE_SECONDS a workload (default 60), its report first, then
#                                  with the tiles on tensor cores, KILN_CUDA_TF32X3=1, also
#                                  within 48 KiB of shared memory, KILN_CUDA_TC_SHARED_KIB=48,
#                                  and fmnist-mlp-4k fully tiled on them, its slabs split a turn
#                                  ahead and in their turn, KILN_CUDA_SPLIT_AHEAD=0, within
#                                  48 KiB, at their shape's depth, KILN_CUDA_DEEP_SLABS=0,
#                                  and their turns one at a time rather than in passes,
#                                  KILN_CUDA_TURN_PASSES=0), with the card's name;
#                                  then a per-kernel profile of each workload
#                                  (tiled products, and again with them on cuBLAS) and the product
#                                  benchmark (each workload product as cuBLAS + epilogue and with
#                                  every tiling, the fastest of each written to a tile table,
#                                  tiles.txt) and the step benchmark tuned by that table
#                                  (KILN_CUDA_TILES; KILN_GPU_PROFILE=0 leaves these out,
#                                  KILN_GPU_PRODUCTS=0 the product benchmark alone), and
#                                  Nsight Compute's device time of every kernel of each workload
#                                  (KILN_GPU_NCU=0 leaves it out); then the
#                                  benchmark without CUDA graphs, on one stream, with outputs read
#                                  back through page-locked memory, with every kernel
#                                  on its own, with medium float products on cuBLAS, with small
#                                  products' long dots one per output thread, with larger
#                                  products inside single-block runs, compiled cold
#                                  to PTX rather than machine code, and with fmnist-mlp-4k fully
#                                  tiled; last, a summary of the step times under each setting
#                                  and of each workload against its target (default and best).
#                                  Should the driver refuse NVRTC's machine code (cubins), the
#                                  run says so and goes on with PTX (KILN_CUDA_PTX=1).
#                                  KILN_GPU_SANITIZE=1 also runs tests/cuda_device.rs under
#                                  compute-sanitizer's racecheck, memcheck and synccheck.
#   scripts/gpu-check.sh --summary (on the GPU machine) only the summary, from the benchmark files
#                                  of an earlier run (one cut short by a time limit): the newest
#                                  archive it left in $OUT.
#
# Every file a run writes (logs, benchmark rows, profiles, tile tables) ends up in one archive in
# $OUT, gpu-check-<all|ab>-<time>.tgz, as a lease brings back at most 8 files.
#   scripts/gpu-check.sh --ab N SETTING...
#                                  (on the GPU machine) N interleaved rounds of the step benchmark
#                                  under each SETTING (VAR=value[,VAR=value...], or "default"),
#                                  then each workload's median per setting: what a default is
#                                  decided on, the settings timed side by side on one card.
#   scripts/gpu-check.sh --timeline [SETTING...]
#                                  (on the GPU machine) each workload's step under Nsight Systems
#                                  (nsys, CUDA graph nodes traced) under each SETTING (as --ab's;
#                                  default "default"), summarised by scripts/timeline.py: the
#                                  median step's span, how much of it a kernel runs and how much
#                                  the GPU idles between kernels, and each kernel's start, time
#                                  and the idle time before it, as the replayed graph ran; then
#                                  between steps, the call period, the GPU's wait for the host,
#                                  the copies and memsets in it and the launch latency. The
#                                  whole run does the same for the default (KILN_GPU_TIMELINE=0
#                                  leaves it out); TIMELINE_WORKLOADS picks the workloads.
#
# KILN_GPU_DEADLINE=S ends the run within S seconds of its start: each test binary and benchmark
# row gets at most what is left, and what would start with less than 5 s left is skipped (a lease
# is short; give the run's command a time limit above S).
#
# The CUDA libraries are looked up under $CUDA_LIB (default: the CUDA 13.0 toolkit's lib folder).
set -u
DIR=${KILN_GPU_DIR:-.gpu}
# KILN_GPU_TESTS picks test binaries (to fit a carry limit; "none": no tests); KILN_GPU_BENCH=0
# skips the benchmark; KILN_GPU_EXAMPLE=0 leaves out the main example. So a run that may not fit
# one command's time limit can be cut in two: KILN_GPU_BENCH=0 (tests and example), then
# KILN_GPU_TESTS=none KILN_GPU_EXAMPLE=0 (the benchmarks).
# KILN_GPU_TEST_TIMEOUT and KILN_GPU_BENCH_TIMEOUT bound each test binary's and each benchmark
# row's run (seconds; default 300), so that a hang costs a lease no more than that.
TEST_TIMEOUT=${KILN_GPU_TEST_TIMEOUT:-300}
BENCH_TIMEOUT=${KILN_GPU_BENCH_TIMEOUT:-300}
TESTS=${KILN_GPU_TESTS:-"op_table gradcheck backend_agreement cuda_device cuda_products cuda_codegen cuda_lt api nn autotune"}
[ "$TESTS" = none ] && TESTS=""

if [ "${1:-}" = "--build" ]; then
    set -e
    # Built into a folder of its own: other files under $DIR (a lease's own scripts) stay.
    OUT_BUNDLE=$DIR
    DIR=$(mktemp -d)
    cargo test --release --no-run 2>&1 | grep -o 'tests/[a-z_]*\.rs (target/release/deps/[^)]*)' |
        while read -r src bin; do
            name=$(basename "$src" .rs)
            bin=${bin#(}; bin=${bin%)}
            if [[ " $TESTS " == *" $name "* ]]; then cp "$bin" "$DIR/$name"; strip "$DIR/$name"; fi
        done
    if [ "${KILN_GPU_BENCH:-1}" != 0 ]; then
        for b in steps products; do
            bin=$(cargo bench --bench $b --no-run 2>&1 | grep -o "target/release/deps/$b-[0-9a-f]*" | head -1)
            cp "$bin" "$DIR/$b"
            strip "$DIR/$b"
        done
    fi
    if [ "${KILN_GPU_EXAMPLE:-1}" != 0 ]; then
        cargo build --release --example fashion_mnist_mlp
        cp target/release/examples/fashion_mnist_mlp "$DIR/fashion_mnist_mlp"
        strip "$DIR/fashion_mnist_mlp"
    fi
    # Packed: the binaries share most of their bytes, and a carry holds 64 MiB.
    mkdir -p "$OUT_BUNDLE"
    tar -czf "$OUT_BUNDLE/bundle.tgz" -C "$DIR" .
    rm -rf "$DIR"
    ls -la "$OUT_BUNDLE"
    exit 0
fi
if [ -f "$DIR/bundle.tgz" ]; then
    unpacked=$(mktemp -d)
    tar -xzf "$DIR/bundle.tgz" -C "$unpacked"
    DIR=$unpacked
fi

# The tests run the GPU only: the emulator's share ran on the development machine.
export KILN_TEST_EMULATOR=0
export LD_LIBRARY_PATH=${CUDA_LIB:-/usr/local/cuda-13.0/targets/x86_64-linux/lib}:${LD_LIBRARY_PATH:-}
# A lease brings back at most 8 files of $OUT, and a run writes some sixty (logs, benchmark rows,
# profiles, Nsight reports, tuned tables). So the run writes them into a folder of its own and, when
# it ends however it ends (a time limit included), packs that folder into one archive in $OUT:
# gpu-check-<mode>-<time>.tgz (`tar -xzf` it; `--summary` reads the newest). Without $OUT (a run
# by hand) the files stay in /tmp/kiln-gpu-check.
RESULTS=${OUT:-}
if [ -n "$RESULTS" ]; then
    OUT_DIR=$(mktemp -d /tmp/kiln-gpu-check.XXXXXX)
    mode=all
    case "${1:-}" in --ab) mode=ab ;; --summary) mode=summary ;; --timeline) mode=timeline ;; esac
    archive="$RESULTS/gpu-check-$mode-$(date +%H%M%S).tgz"
    pack() {
        [ "$mode" = summary ] || tar -czf "$archive" -C "$OUT_DIR" . 2>/dev/null
        rm -rf "$OUT_DIR"
    }
    trap pack EXIT
    trap 'exit 143' TERM INT
else
    OUT_DIR=/tmp/kiln-gpu-check
fi
mkdir -p "$OUT_DIR"
DEADLINE=$(( $(date +%s) + ${KILN_GPU_DEADLINE:-1000000} ))
# within <seconds>: the time limit for a step that would take at most that, given the deadline;
# fails (the step is to be skipped) when less than 5 s are left.
within() {
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -ge 5 ] || return 1
    echo $(( $1 < left ? $1 : left ))
}
# bounded <seconds> <command...>: the command under `within`'s limit, or skipped (status 124).
bounded() {
    local limit
    limit=$(within "$1") || { echo "(skipped: out of time)" >&2; return 124; }
    shift
    timeout "$limit" "$@"
}
# timeline <setting>: each workload's step under Nsight Systems with every node of its CUDA graph
# traced (start and end on the card), summarised by timeline.py; the trace itself is not kept.
timeline() {
    local setting=$1 vars=() nsys tag w trace
    [ "$setting" = default ] || IFS=, read -ra vars <<<"$setting"
    nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys \
        /opt/nvidia/nsight-systems/*/target-linux-x64/nsys 2>/dev/null | head -1)
    if [ -z "$nsys" ] || ! command -v python3 >/dev/null; then
        echo "== timeline ($setting): nsys or python3 not found, skipped"
        return
    fi
    echo "== timeline of each step as the card ran it (Nsight Systems, graph nodes traced; $setting)"
    tag=$(tr -c 'A-Za-z0-9\n' - <<<"$setting")
    for w in ${TIMELINE_WORKLOADS:-fmnist-mlp fmnist-mlp-4k autoencoder}; do
        trace="$OUT_DIR/timeline-$w-$tag"
        bounded 120 env "${vars[@]}" "$nsys" profile --trace=cuda --cuda-graph-trace=node --sample=none \
            --cpuctxsw=none --export=sqlite --force-overwrite=true -o "$trace" \
            "$DIR/steps" --device cuda --workload "$w" --seconds 0.3 >"$trace.log" 2>&1
        if [ -s "$trace.sqlite" ]; then
            python3 "$(dirname "$0")/timeline.py" "$trace.sqlite" "$w ($setting)" 2>&1 | tee "$trace.txt"
        else
            echo "-- $w ($setting): no trace written; the end of nsys's output:"
            tail -n 5 "$trace.log"
        fi
        rm -f "$trace.sqlite" "$trace.nsys-rep"
    done
}
if [ "${1:-}" = "--timeline" ]; then
    shift
    export KILN_CACHE_DIR=${KILN_CACHE_DIR:-$(mktemp -d)}
    [ $# -gt 0 ] || set -- default
    for setting in "$@"; do timeline "$setting"; done
    exit 0
fi
if [ "${1:-}" = "--ab" ]; then
    rounds=${2:?--ab needs a number of rounds and settings}
    shift 2
    export KILN_CACHE_DIR=${KILN_CACHE_DIR:-$(mktemp -d)}
    for round in $(seq "$rounds"); do
        i=0
        for setting in "$@"; do
            i=$((i + 1))
            vars=()
            [ "$setting" = default ] || IFS=, read -ra vars <<<"$setting"
            limit=$(within "$BENCH_TIMEOUT") || { echo "-- out of time: round $round stopped"; break 2; }
            env "${vars[@]}" timeout "$limit" "$DIR/steps" --device cuda --seconds "${BENCH_SECONDS:-1}" \
                >"$OUT_DIR/ab-$i-$round.txt" 2>&1
            printf '%-40s round %s:' "$setting" "$round"
            awk '$2 ~ /^cuda/ { printf " %s %s", $1, $4 }' "$OUT_DIR/ab-$i-$round.txt"
            echo
        done
    done
    echo "== median ms per step of each setting over its rounds"
    printf '%-40s' setting
    for w in keras-mlp fmnist-mlp fmnist-mlp-4k autoencoder; do printf ' %14s' "$w"; done
    echo
    i=0
    for setting in "$@"; do
        i=$((i + 1))
        printf '%-40s' "$setting"
        for w in keras-mlp fmnist-mlp fmnist-mlp-4k autoencoder; do
            m=$(cat "$OUT_DIR"/ab-$i-*.txt 2>/dev/null | awk -v w="$w" '$1 == w && $2 ~ /^cuda/ { print $4 }' |
                sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }')
            printf ' %14s' "${m:--}"
        done
        echo
    done
    exit 0
fi
summary() {
    echo "== summary: median ms per step (compile ms for the cold and cached rows)"
    summary_files=(cold cached stages1 stages8 kgroups0 pdl pdl-late stages8-pdl noclusters old-defaults rowtail0 lt stepordered clustersfirst lookahead12 chainjoins priority0 quadcopies0 deepslabs0 egress0 autotuned tf32x3 tf32x3-48k tf32x3-4k tf32x3-4k-inturn tf32x3-4k-48k tf32x3-4k-shallow tuned eager 1stream pinned unjoined cublas dots runmacs cold-ptx tiled-4k)
    (
        cd "$OUT_DIR" || exit
        printf '%-16s' workload
        for f in "${summary_files[@]}"; do printf ' %15s' "$f"; done
        echo
        for w in keras-mlp fmnist-mlp fmnist-mlp-4k autoencoder; do
            printf '%-16s' "$w"
            for f in "${summary_files[@]}"; do
                # columns: workload device batch median_ms min_ms max_ms steps compile_ms
                v=$(awk -v w="$w" -v f="$f" '$1 == w && $2 ~ /^cuda/ { m = $4; if (f ~ /^cold|^cached/) m = m " (" $8 ")" } END { print m }' "bench-$f.txt" 2>/dev/null)
                printf ' %15s' "${v:--}"
            done
            echo
        done
        # The issue's targets (H100, ms per step): half the best peer's time, and for fmnist-mlp-4k
        # 1.25x of the cuBLAS floor; against the default setting (cached) and the best of all.
        echo
        printf '%-16s %8s %10s %s\n' workload target default "best (setting)"
        for wt in keras-mlp:0.025 fmnist-mlp:0.045 fmnist-mlp-4k:0.1625 autoencoder:0.154; do
            w=${wt%%:*} target=${wt#*:}
            default=$(awk -v w="$w" '$1 == w && $2 ~ /^cuda/ { print $4 }' bench-cached.txt 2>/dev/null)
            best=$(for f in "${summary_files[@]}"; do
                awk -v w="$w" -v f="$f" '$1 == w && $2 ~ /^cuda/ { print $4, f }' "bench-$f.txt" 2>/dev/null
            done | sort -g | head -1)
            printf '%-16s %8s %10s %s\n' "$w" "$target" "${default:--}" "${best:--}"
        done
    )
}
if [ "${1:-}" = "--summary" ]; then
    # Only the summary, from the benchmark files of an earlier run (one cut short, say): its
    # archive in $OUT, the newest, or what a run by hand left in /tmp/kiln-gpu-check.
    latest=$(ls -t "${RESULTS:-/nonexistent}"/gpu-check-all-*.tgz 2>/dev/null | head -1)
    [ -n "$latest" ] && tar -xzf "$latest" -C "$OUT_DIR"
    summary
    exit 0
fi
echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
echo "== tests"
printf '%-20s %-8s %s\n' binary result summary
status=0
for t in $TESTS; do
    [ -x "$DIR/$t" ] || { printf '%-20s %-8s %s\n' "$t" missing "run --build first"; status=1; continue; }
    filter=()
    # The snapshot tests need the source tree's snapshots; on the GPU machine only the GPU parts run.
    [ "$t" = cuda_codegen ] && filter=(cuda_device_errors every_workload kernels_name is_cached)
    [ "$t" = nn ] && filter=(fit_on_the_gpu dropout_is_off)
    limit=$(within "$TEST_TIMEOUT") || { printf '%-20s %-8s %s\n' "$t" skipped "out of time"; continue; }
    start=$(date +%s%N)
    if timeout "$limit" "$DIR/$t" "${filter[@]}" >"$OUT_DIR/$t.log" 2>&1; then r=ok; else r=FAILED; status=1; fi
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    summary=$(grep -E '^test result' "$OUT_DIR/$t.log" | tail -1 | sed 's/test result: //; s/; 0 measured.*//')
    printf '%-20s %-8s %s (%d ms)\n' "$t" "$r" "$summary" "$ms"
    [ "$r" = ok ] || grep -E 'panicked|FAILED|Error|error' "$OUT_DIR/$t.log" | head -20
    grep -h '^note:' "$OUT_DIR/$t.log" | sort -u
done
if grep -qs "loading the compiled module failed" "$OUT_DIR"/*.log; then
    # The driver refused NVRTC's machine code (first tried on this card in this run): go on with
    # PTX, which the driver compiles itself, so that the rest of the run still measures something.
    echo "!! the driver did not load NVRTC's cubin; the rest of this run uses PTX (KILN_CUDA_PTX=1)"
    export KILN_CUDA_PTX=1
    if [ -x "$DIR/backend_agreement" ]; then
        if timeout "$TEST_TIMEOUT" "$DIR/backend_agreement" >"$OUT_DIR/backend_agreement-ptx.log" 2>&1; then r=ok; else r=FAILED; fi
        printf '%-20s %-8s %s\n' "backend_agreement" "$r" "with KILN_CUDA_PTX=1"
    fi
fi
if [ -x "$DIR/backend_agreement" ] && [[ " $TESTS " == *" backend_agreement "* ]]; then
    # The same agreement with the reference with every step on one stream (the default spreads
    # independent steps over two), with the float products on cuBLAS (the default tiles the
    # workloads' products), with the tiles on tensor cores (3xTF32, opt-in until it wins), and with
    # small products' long dots computed one per output thread (the default tiles them), with
    # the outputs read back through page-locked memory (opt-in until timed), with the next slab
    # through registers (the default copies slabs asynchronously into three buffers) and with as
    # many buffers as fit of eight, with 32x32 tiles
    # computed as before the thread groups (2x2 outputs a thread), with programmatic dependent
    # launch (opt-in until timed), and with a sliced tile's partial tiles through scratch memory
    # and a ticket (the default adds them in a thread block cluster), and with the loss's row
    # pass as a kernel of its own (the default runs it at the end of the logits' product), and
    # with cuBLAS's products' bias epilogues in cuBLASLt (opt-in until timed; tests/cuda_lt.rs
    # runs fmnist-mlp so, its products on cuBLAS, and fmnist-mlp-4k), and with each returned output
    # copied back on its own and the error word cleared inside the step (as before the egress),
    # and with the slice count nearest to the one the tiling rule wants (opt-in until timed).
    for setting in KILN_CUDA_STREAMS=1 KILN_CUDA_TILED=0 KILN_CUDA_TF32X3=1 KILN_CUDA_DOT_DEPTH=1073741824 \
        KILN_CUDA_PINNED=1 KILN_CUDA_STAGES=1 KILN_CUDA_STAGES=8 KILN_CUDA_K_GROUPS=0 KILN_CUDA_PDL=1 KILN_CUDA_PDL=late \
        KILN_CUDA_CLUSTERS=0 KILN_CUDA_ROW_TAIL=0 KILN_CUDA_LT=1 KILN_CUDA_EGRESS=0 KILN_CUDA_NEAREST_SLICES=1; do
        log="$OUT_DIR/backend_agreement-$setting.log"
        limit=$(within "$TEST_TIMEOUT") || { printf '%-20s %-8s %s\n' backend_agreement skipped "with $setting: out of time"; continue; }
        if env "$setting" timeout "$limit" "$DIR/backend_agreement" >"$log" 2>&1; then r=ok; else r=FAILED; status=1; fi
        printf '%-20s %-8s %s\n' "backend_agreement" "$r" "with $setting"
        [ "$r" = ok ] || grep -E 'panicked|FAILED|Error|error' "$log" | head -20
    done
fi
if [ "${KILN_GPU_SANITIZE:-0}" = 1 ]; then
    # Opt-in (many times slower): NVIDIA's own checks of what the emulator's race check and guard
    # bytes cover on the CPU: shared-memory hazards (racecheck), out-of-bounds and misaligned
    # accesses (memcheck) and barrier misuse (synccheck), on the kernels of tests/cuda_device.rs.
    sanitizer=${CUDA_HOME:-/usr/local/cuda-13.0}/bin/compute-sanitizer
    if [ -x "$sanitizer" ] && [ -x "$DIR/cuda_device" ]; then
        for tool in racecheck memcheck synccheck; do
            log="$OUT_DIR/sanitize-$tool.log"
            if bounded 300 "$sanitizer" --tool "$tool" --error-exitcode 1 "$DIR/cuda_device" --test-threads 1 \
                >"$log" 2>&1; then r=ok; else r=FAILED; status=1; fi
            printf '%-20s %-8s %s\n' "cuda_device" "$r" "under compute-sanitizer --tool $tool"
            [ "$r" = ok ] || grep -E 'ERROR|Error|hazard|panicked' "$log" | head -20
        done
    else
        echo "compute-sanitizer ($sanitizer) or the cuda_device binary not found: its checks skipped"
    fi
fi
if [ -x "$DIR/fashion_mnist_mlp" ] && [ "${KILN_GPU_EXAMPLE:-1}" != 0 ]; then
    echo "== the main example on the GPU (the shipped subset)"
    bounded 120 "$DIR/fashion_mnist_mlp" --device cuda --data-dir data/fashion-mnist --out "$OUT_DIR/fmnist" 2>&1 | grep -v '^Epoch' | tail -n 8
fi
[ "${KILN_GPU_BENCH:-1}" = 0 ] && exit $status
# The step times first (what the issue's targets are about), then what tuning needs (profiles and
# the product benchmark), then the step times under each setting, so that a run cut short by the
# machine's time limit still has the headline.
bench_row() { # bench_row <title> <file> [VAR=value ...] [-- steps args]
    local title=$1 file=$2 vars=() limit=$BENCH_TIMEOUT
    shift 2
    while [ $# -gt 0 ] && [ "$1" != -- ]; do vars+=("$1"); shift; done
    [ "${1:-}" = -- ] && shift
    # An autotuned row also spends its budget, a workload at a time.
    [[ " $* " == *" --autotune-budget "* ]] && limit=$((BENCH_TIMEOUT + 4 * ${AUTOTUNE_SECONDS:-60}))
    limit=$(within "$limit") || { echo "-- $title: skipped, out of time"; return; }
    echo "-- $title"
    env "${vars[@]}" timeout "$limit" "$DIR/steps" --device cuda --seconds "${BENCH_SECONDS:-1}" "$@" 2>&1 |
        tee "$OUT_DIR/$file"
}
echo "== benchmark (ms per full training step, f32; compile_ms includes graph building)"
export KILN_CACHE_DIR=$(mktemp -d)
bench_row "cold: NVRTC compiles every step" bench-cold.txt
bench_row "again: PTX from the disk cache" bench-cached.txt
bench_row "the next slab through registers, not copied asynchronously into three buffers (KILN_CUDA_STAGES=1)" \
    bench-stages1.txt KILN_CUDA_STAGES=1
bench_row "slabs copied asynchronously, as many buffers as fit of 8 (KILN_CUDA_STAGES=8: a slice's slabs in flight)" \
    bench-stages8.txt KILN_CUDA_STAGES=8
bench_row "32x32 tiles without thread groups (KILN_CUDA_K_GROUPS=0: 2x2 outputs a thread, as before)" \
    bench-kgroups0.txt KILN_CUDA_K_GROUPS=0
bench_row "each kernel launched before the one ahead of it ends (KILN_CUDA_PDL=1, programmatic dependent launch)" \
    bench-pdl.txt KILN_CUDA_PDL=1
bench_row "the next kernel let launch at the end of each block (KILN_CUDA_PDL=late)" bench-pdl-late.txt KILN_CUDA_PDL=late
bench_row "eight buffers and dependent launch (KILN_CUDA_STAGES=8 KILN_CUDA_PDL=1)" bench-stages8-pdl.txt KILN_CUDA_STAGES=8 \
    KILN_CUDA_PDL=1
bench_row "a sliced tile's partial tiles through scratch memory and a ticket, not a cluster (KILN_CUDA_CLUSTERS=0)" \
    bench-noclusters.txt KILN_CUDA_CLUSTERS=0
bench_row "neither default: one slab buffer, no clusters (KILN_CUDA_STAGES=1 KILN_CUDA_CLUSTERS=0, as before 2026-11-28)" \
    bench-old-defaults.txt KILN_CUDA_STAGES=1 KILN_CUDA_CLUSTERS=0
bench_row "the loss's row pass as a kernel of its own, not at the end of the logits' product (KILN_CUDA_ROW_TAIL=0)" \
    bench-rowtail0.txt KILN_CUDA_ROW_TAIL=0
bench_row "cuBLAS's products through cuBLASLt, algorithms timed, bias and ReLU in its epilogue (KILN_CUDA_LT=1)" \
    bench-lt.txt KILN_CUDA_LT=1
bench_row "a side-by-side kernel's sections in step order, not the longest-running first (KILN_CUDA_LONGEST_FIRST=0)" \
    bench-stepordered.txt KILN_CUDA_LONGEST_FIRST=0
bench_row "clustered sections first, joining only on a cluster's first block in step order (KILN_CUDA_CLUSTERS_FIRST=1, as before)" \
    bench-clustersfirst.txt KILN_CUDA_CLUSTERS_FIRST=1
bench_row "kernels joined side by side from at most 12 steps on, not 64 (KILN_CUDA_LOOKAHEAD=12, as before)" \
    bench-lookahead12.txt KILN_CUDA_LOOKAHEAD=12
bench_row "launches joining the kernels the step waits for even where they hold them up (KILN_CUDA_CHAIN_JOINS=1, as before)" \
    bench-chainjoins.txt KILN_CUDA_CHAIN_JOINS=1
bench_row "every stream at the default priority, not the chain's first (KILN_CUDA_PRIORITY=0, as before)" \
    bench-priority0.txt KILN_CUDA_PRIORITY=0
bench_row "slabs copied a word at a time, not 16 bytes where they can be (KILN_CUDA_QUAD_COPIES=0, as before)" \
    bench-quadcopies0.txt KILN_CUDA_QUAD_COPIES=0
bench_row "unsliced tiles' slabs at their shape's depth, not twice it (KILN_CUDA_DEEP_SLABS=0, as before)" \
    bench-deepslabs0.txt KILN_CUDA_DEEP_SLABS=0
bench_row "each returned output copied back on its own, the error word cleared inside the step (KILN_CUDA_EGRESS=0, as before)" \
    bench-egress0.txt KILN_CUDA_EGRESS=0
bench_row "the slice count nearest to the one the tiling rule wants, not the most up to it (KILN_CUDA_NEAREST_SLICES=1)" \
    bench-nearestslices.txt KILN_CUDA_NEAREST_SLICES=1
bench_row "FMA tiles' slab loops in passes of turns, each turn's buffers constants (KILN_CUDA_TURN_PASSES=1)" \
    bench-turnpasses.txt KILN_CUDA_TURN_PASSES=1
# Each workload autotuned (Function::autotune: every product as cuBLAS and in each tiling, the
# whole step timed for each, then the step's knobs: dependent launch, streams, two bounds; its
# report first, then the tuned step's times).
bench_row "autotuned: each step's products and knobs timed on this card (Function::autotune)" bench-autotuned.txt \
    -- --autotune-budget "${AUTOTUNE_SECONDS:-60}"
# What each search found (the cache entries: a tile table with the step's knobs), to keep.
mkdir -p "$OUT_DIR/tuned" && cp "$KILN_CACHE_DIR"/tuned/*.txt "$OUT_DIR/tuned/" 2>/dev/null
bench_row "tiled products on tensor cores at float32 accuracy (KILN_CUDA_TF32X3=1)" bench-tf32x3.txt KILN_CUDA_TF32X3=1
bench_row "the same within 48 KiB of static shared memory a tile (KILN_CUDA_TC_SHARED_KIB=48, as before)" \
    bench-tf32x3-48k.txt KILN_CUDA_TF32X3=1 KILN_CUDA_TC_SHARED_KIB=48
echo "-- fmnist-mlp-4k with every product tiled, on tensor cores (KILN_CUDA_TF32X3=1, KILN_CUDA_TILED_MACS=2^30)"
bounded 120 env KILN_CUDA_TF32X3=1 KILN_CUDA_TILED_MACS=1073741824 "$DIR/steps" --device cuda --workload fmnist-mlp-4k \
    --seconds ${BENCH_SECONDS:-1} 2>&1 | tee "$OUT_DIR/bench-tf32x3-4k.txt"
echo "-- the same with each slab split in its turn, not a turn ahead (KILN_CUDA_SPLIT_AHEAD=0, as before)"
bounded 120 env KILN_CUDA_TF32X3=1 KILN_CUDA_TILED_MACS=1073741824 KILN_CUDA_SPLIT_AHEAD=0 "$DIR/steps" --device cuda \
    --workload fmnist-mlp-4k --seconds ${BENCH_SECONDS:-1} 2>&1 | tee "$OUT_DIR/bench-tf32x3-4k-inturn.txt"
echo "-- the same split ahead within 48 KiB of static shared memory a tile (KILN_CUDA_TC_SHARED_KIB=48, as before)"
bounded 120 env KILN_CUDA_TF32X3=1 KILN_CUDA_TILED_MACS=1073741824 KILN_CUDA_TC_SHARED_KIB=48 "$DIR/steps" --device cuda \
    --workload fmnist-mlp-4k --seconds ${BENCH_SECONDS:-1} 2>&1 | tee "$OUT_DIR/bench-tf32x3-4k-48k.txt"
echo "-- the same with 128x64 slabs 8 deep, not 16 (KILN_CUDA_DEEP_SLABS=0, as before)"
bounded 120 env KILN_CUDA_TF32X3=1 KILN_CUDA_TILED_MACS=1073741824 KILN_CUDA_DEEP_SLABS=0 "$DIR/steps" --device cuda \
    --workload fmnist-mlp-4k --seconds ${BENCH_SECONDS:-1} 2>&1 | tee "$OUT_DIR/bench-tf32x3-4k-shallow.txt"
echo "-- the same with the slab loop's turns one at a time, not in passes (KILN_CUDA_TURN_PASSES=0, as before)"
bounded 120 env KILN_CUDA_TF32X3=1 KILN_CUDA_TILED_MACS=1073741824 KILN_CUDA_TURN_PASSES=0 "$DIR/steps" --device cuda \
    --workload fmnist-mlp-4k --seconds ${BENCH_SECONDS:-1} 2>&1 | tee "$OUT_DIR/bench-tf32x3-4k-single-turns.txt"
if [ "${KILN_GPU_PROFILE:-1}" = 1 ]; then
    echo "== per-step profile (CUDA events around every kernel and product; no graphs)"
    bounded 120 env KILN_CUDA_PROFILE=1 "$DIR/steps" --device cuda --seconds 0.3 2>&1 | grep -v compile: | tee "$OUT_DIR/profile.txt"
    echo "-- the same with the medium products on cuBLAS (KILN_CUDA_TILED=0)"
    bounded 120 env KILN_CUDA_TILED=0 KILN_CUDA_PROFILE=1 "$DIR/steps" --device cuda --seconds 0.3 2>&1 | grep -v compile: | tee "$OUT_DIR/profile-cublas.txt"
    echo "-- fmnist-mlp-4k with every product tiled (KILN_CUDA_TILED_MACS=2^30)"
    bounded 120 env KILN_CUDA_TILED_MACS=1073741824 KILN_CUDA_PROFILE=1 "$DIR/steps" --device cuda --workload fmnist-mlp-4k --seconds 0.3 2>&1 | grep -v compile: | tee "$OUT_DIR/profile-tiled-4k.txt"
    echo "-- fmnist-mlp-4k's products through cuBLASLt, each with the algorithm chosen and its time (KILN_CUDA_LT=1)"
    bounded 120 env KILN_CUDA_LT=1 KILN_CUDA_PROFILE=1 "$DIR/steps" --device cuda --workload fmnist-mlp-4k --seconds 0.3 2>&1 | grep -v compile: | tee "$OUT_DIR/profile-lt-4k.txt"
    echo "-- the same on tensor cores (KILN_CUDA_TF32X3=1)"
    bounded 120 env KILN_CUDA_TF32X3=1 KILN_CUDA_TILED_MACS=1073741824 KILN_CUDA_PROFILE=1 "$DIR/steps" --device cuda --workload fmnist-mlp-4k --seconds 0.3 2>&1 | grep -v compile: | tee "$OUT_DIR/profile-tf32x3-4k.txt"
    if [ "${KILN_GPU_PRODUCTS:-1}" = 1 ]; then
        echo "== products: device us per call of relu(a b + bias), cuBLAS + epilogue vs tilings (* fastest)"
        # (Each function's profile, printed when it is dropped, left out.)
        bounded 300 "$DIR/products" --device cuda --write-table "$OUT_DIR/tiles.txt" 2>&1 |
            grep -v -e '^kiln CUDA profile' -e '^ *[0-9.]* us ' | tee "$OUT_DIR/products.txt"
    fi
    if grep -qsv "^#" "$OUT_DIR/tiles.txt"; then
        # The fastest choice of each product, as the product benchmark just measured it.
        bench_row "tuned: every product as the tile table says (KILN_CUDA_TILES=tiles.txt)" bench-tuned.txt \
            KILN_CUDA_TILES="$OUT_DIR/tiles.txt"
        echo "-- its per-step profile"
        bounded 120 env KILN_CUDA_TILES="$OUT_DIR/tiles.txt" KILN_CUDA_PROFILE=1 "$DIR/steps" --device cuda --seconds 0.3 2>&1 |
            grep -v compile: | tee "$OUT_DIR/profile-tuned.txt"
    fi
fi
if [ "${KILN_GPU_NCU:-1}" = 1 ]; then
    # Nsight Compute's device time of every kernel (each on its own, caches flushed: an upper
    # bound, but without the events' launch latency), median per kernel over two steps or so.
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -n "$ncu" ] && command -v python3 >/dev/null; then
        # Shared-memory loads: wavefronts (each a cycle of the SM's shared-memory port) and those
        # lost to bank conflicts.
        SHARED_LOAD_METRICS=l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum
        echo "== per-kernel device time (Nsight Compute, eager, us; median over the launches captured)"
        for w in keras-mlp fmnist-mlp fmnist-mlp-4k autoencoder; do
            case $w in autoencoder) n=80 ;; fmnist-mlp-4k) n=40 ;; *) n=16 ;; esac
            bounded 90 env KILN_CUDA_GRAPHS=0 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
                --launch-skip $((n * 3 / 4)) --launch-count $n "$DIR/steps" --device cuda --workload $w --seconds 0 \
                >"$OUT_DIR/ncu-$w.csv" 2>"$OUT_DIR/ncu-$w.err"
            echo "-- $w"
            python3 - "$OUT_DIR/ncu-$w.csv" <<'PY'
import csv, sys
from collections import defaultdict
rows = list(csv.reader(line for line in open(sys.argv[1]) if line.startswith('"')))
if not rows:
    sys.exit(print("   no kernels captured (see the .err file)"))
head = rows[0]
name, value, unit = (head.index(c) for c in ("Kernel Name", "Metric Value", "Metric Unit"))
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
times = defaultdict(list)
for r in rows[1:]:
    times[r[name][:70]].append(float(r[value].replace(",", "")) * scale.get(r[unit], 1.0))
medians = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
for k, t in sorted(medians.items(), key=lambda kv: -kv[1]):
    print(f"{t:9.2f}  {k} (x{len(times[k])})")
print(f"{sum(medians.values()):9.2f}  every kernel once")
PY
        done
        # Why each kernel takes what it takes: throughput against the card's peaks, occupancy and
        # its limits, the warps' stall cycles, and the shared-memory loads' wavefronts and bank
        # conflicts (a tile's reads of its slabs), every launch of the third step (the whole
        # reports come back in the run's archive, for the sessions after this lease to read).
        echo "== the kernels of fmnist-mlp, fmnist-mlp-4k and the autoencoder in detail (Nsight Compute sections)"
        for w in fmnist-mlp fmnist-mlp-4k autoencoder; do
            case $w in autoencoder) n=17 ;; fmnist-mlp-4k) n=14 ;; *) n=6 ;; esac
            bounded 120 env KILN_CUDA_GRAPHS=0 "$ncu" --clock-control none --section SpeedOfLight --section Occupancy \
                --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
                --section SchedulerStats --metrics "$SHARED_LOAD_METRICS" --launch-skip $((n * 2)) --launch-count $n \
                "$DIR/steps" --device cuda --workload $w --seconds 0 >"$OUT_DIR/ncu-detail-$w.txt" 2>&1
            echo "-- $w (the whole report: ncu-detail-$w.txt)"
            grep -E '^  k[0-9]|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Block Limit (Registers|Shared Mem)|Warp Cycles Per Issued|Dynamic Shared|Static Shared|mem_shared_op_ld' \
                "$OUT_DIR/ncu-detail-$w.txt" | head -80
        done
    else
        echo "== per-kernel device time: ncu or python3 not found, skipped"
    fi
fi
[ "${KILN_GPU_TIMELINE:-1}" = 1 ] && timeline default
echo "== the benchmark under each setting"
bench_row "without CUDA graphs (every kernel launched from the host)" bench-eager.txt KILN_CUDA_GRAPHS=0
bench_row "every step on one stream (KILN_CUDA_STREAMS=1)" bench-1stream.txt KILN_CUDA_STREAMS=1
bench_row "outputs and the error word read back through page-locked memory (KILN_CUDA_PINNED=1)" bench-pinned.txt \
    KILN_CUDA_PINNED=1
bench_row "every kernel on its own (no single-block runs, no kernels side by side, no product in its epilogue)" \
    bench-unjoined.txt KILN_CUDA_JOIN=0
bench_row "medium float products on cuBLAS with their epilogue kernel, not tiled (KILN_CUDA_TILED=0)" \
    bench-cublas.txt KILN_CUDA_TILED=0
bench_row "small products' dots one per output thread, however long (KILN_CUDA_DOT_DEPTH=2^30)" \
    bench-dots.txt KILN_CUDA_DOT_DEPTH=1073741824
bench_row "products of up to 2^19 multiply-adds inside single-block runs (KILN_CUDA_RUN_MACS; fmnist-mlp: 6 kernels)" \
    bench-runmacs.txt KILN_CUDA_RUN_MACS=524288
bench_row "cold again, as PTX that the driver compiles at load (KILN_CUDA_PTX=1, its JIT cache off)" \
    bench-cold-ptx.txt KILN_CUDA_PTX=1 CUDA_CACHE_DISABLE=1 KILN_CACHE_DIR="$(mktemp -d)"
echo "-- every product with an epilogue tiled, up to 2^30 multiply-adds (KILN_CUDA_TILED_MACS; fmnist-mlp-4k)"
bounded 120 env KILN_CUDA_TILED_MACS=1073741824 "$DIR/steps" --device cuda --workload fmnist-mlp-4k --seconds ${BENCH_SECONDS:-1} 2>&1 | tee "$OUT_DIR/bench-tiled-4k.txt"
summary
exit $status
