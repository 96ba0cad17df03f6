#!/usr/bin/env python3
"""Where a training step's time goes on the GPU, read from an Nsight Systems trace.

`scripts/gpu-check.sh --timeline` runs the step benchmark under `nsys profile --cuda-graph-trace=node
--export=sqlite`, so that every kernel of every replayed CUDA graph has its own start and end, as the
card ran it; this reads the kernels of that trace (table CUPTI_ACTIVITY_KIND_KERNEL, names in
StringIds) and prints, for the median step: how long it spans from its first kernel's start to its
last kernel's end, how much of that some kernel is running, and how much the GPU stands idle
between kernels (launch latency, which fewer kernels or dependent launch would save); then each
kernel's start in the step, its own time and the idle time just before it. Nsight Compute times
each kernel alone with its caches flushed, and kiln's event profile runs without graphs; neither
shows the gaps of a replayed graph, which is what this is for. Then what happens between two
steps, the host's turn: the call period (from one step's first kernel to the next one's, what the
benchmark times as a step), how long the GPU waits between the steps, the copies and memsets in
that time (tables CUPTI_ACTIVITY_KIND_MEMCPY and _MEMSET: the outputs read back, the error word
cleared) and how long after the host's call to launch the next graph (cuGraphLaunch, in table
CUPTI_ACTIVITY_KIND_RUNTIME) its first kernel starts.

The trace holds every run of the step (the eager first call, the warm-up, the timed replays) and
perhaps kernels outside it: a name is taken to be the step's when its count is a multiple of the
step count (the commonest count, cuBLAS's kernels appearing several times a step), the step's
kernels are cut into steps of as many kernels each in order of start (replays do not overlap:
each waits for the one before), and the first fifth of the steps (compilation's eager call and
the warm-up) is left out.

`timeline.py --self-test` checks the arithmetic on a made-up trace (CI runs it).
"""

import bisect
import collections
import sqlite3
import statistics
import sys

# Steps at the start of the trace left out (the eager first call and the warm-up).
WARM_UP_SHARE = 0.2


def read_kernels(path):
    """Every kernel of the trace as (start ns, end ns, stream, name), in order of start."""
    con = sqlite3.connect(path)
    columns = {row[1] for row in con.execute("PRAGMA table_info(CUPTI_ACTIVITY_KIND_KERNEL)")}
    if not columns:
        raise SystemExit(f"{path}: no kernels traced (no table CUPTI_ACTIVITY_KIND_KERNEL)")
    name = next((c for c in ("shortName", "demangledName", "mangledName") if c in columns), None)
    if name is None:
        raise SystemExit(f"{path}: the kernel table has no name column ({sorted(columns)})")
    query = (
        f"SELECT k.start, k.end, k.streamId, s.value FROM CUPTI_ACTIVITY_KIND_KERNEL AS k "
        f"JOIN StringIds AS s ON k.{name} = s.id ORDER BY k.start, k.end"
    )
    return con.execute(query).fetchall()


def has_table(con, table):
    """Whether the trace has `table` (nsys writes one only where it saw such work)."""
    return bool(con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchall())


def read_table(con, table, columns):
    """Rows of `columns` of `table`, in order of start ([] where the trace has no such table)."""
    if not has_table(con, table):
        return []
    return con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY start").fetchall()


def read_host_side(path):
    """The trace's copies and memsets as (start ns, end ns, bytes), and its launches of CUDA graphs
    as the start (ns) of each call to cuGraphLaunch, each in order of start."""
    con = sqlite3.connect(path)
    copies = read_table(con, "CUPTI_ACTIVITY_KIND_MEMCPY", ["start", "end", "bytes"])
    copies += read_table(con, "CUPTI_ACTIVITY_KIND_MEMSET", ["start", "end", "bytes"])
    launches = []
    if has_table(con, "CUPTI_ACTIVITY_KIND_RUNTIME"):
        launches = [
            row[0]
            for row in con.execute(
                "SELECT r.start FROM CUPTI_ACTIVITY_KIND_RUNTIME AS r JOIN StringIds AS s ON r.nameId = s.id "
                "WHERE s.value LIKE 'cuGraphLaunch%' OR s.value LIKE 'cudaGraphLaunch%' ORDER BY r.start"
            )
        ]
    return sorted(copies), launches


def between_steps(steps, copies, launches):
    """For each step but the last: (the call period, the GPU's wait between it and the next step,
    the copies and memsets from its first kernel to the next step's: their count, bytes and time,
    and the time from the last graph launch call before the next step to that step's first kernel
    start, or None), all times in ns. `copies` and `launches` are in order of start, so each step's
    are found by bisection (a trace holds thousands of steps)."""
    copy_starts = [c[0] for c in copies]
    figures = []
    for step, following in zip(steps, steps[1:]):
        first, last = min(k[0] for k in step), max(k[1] for k in step)
        next_first = min(k[0] for k in following)
        mine = copies[bisect.bisect_left(copy_starts, first) : bisect.bisect_left(copy_starts, next_first)]
        called = bisect.bisect_left(launches, next_first)
        latency = next_first - launches[called - 1] if called and launches[called - 1] >= last else None
        busy = sum(c[1] - c[0] for c in mine)
        figures.append((next_first - first, next_first - last, len(mine), sum(c[2] for c in mine), busy, latency))
    return figures


def cut_into_steps(kernels):
    """The step's kernels, cut into steps (each a list in order of start), and the names left out."""
    counts = collections.Counter(name for _, _, _, name in kernels)
    # The commonest count (most kernels run once a step), the larger where two are as common.
    steps = max(collections.Counter(counts.values()).items(), key=lambda item: (item[1], item[0]))[0]
    mine = {name for name, c in counts.items() if c % steps == 0}
    per_step = sum(counts[name] // steps for name in mine)
    kept = [k for k in kernels if k[3] in mine]
    cut = [kept[i : i + per_step] for i in range(0, len(kept), per_step)]
    return cut, sorted(set(counts) - mine)


def step_figures(step):
    """One step's span, busy and idle time (ns), and each kernel's (label, stream, start in the
    step, own time, idle time just before it)."""
    first = min(k[0] for k in step)
    last = max(k[1] for k in step)
    busy, covered_to, rows, seen = 0, first, [], collections.Counter()
    for start, end, stream, name in step:
        idle = max(0, start - covered_to)
        busy += max(0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
        seen[name] += 1
        label = name if seen[name] == 1 else f"{name} #{seen[name]}"
        rows.append((label, stream, start - first, end - start, idle))
    return last - first, busy, rows


def summarise(kernels, title, out=sys.stdout, copies=(), launches=()):
    steps, outside = cut_into_steps(kernels)
    if not steps:
        print(f"{title}: no kernels traced", file=out)
        return None
    skipped = int(len(steps) * WARM_UP_SHARE)
    used = steps[skipped:] or steps
    # A step whose kernels are not the others' (a cut that slipped) is left out, and counted.
    shape = collections.Counter(tuple(sorted(k[3] for k in s)) for s in used).most_common(1)[0][0]
    good_at = {i for i, s in enumerate(steps) if i >= skipped and tuple(sorted(k[3] for k in s)) == shape}
    good = [steps[i] for i in sorted(good_at)]
    figures = [step_figures(s) for s in good]
    median = statistics.median
    span = median(f[0] for f in figures) / 1e3
    busy = median(f[1] for f in figures) / 1e3
    print(
        f"{title}: {len(steps)} steps of {len(shape)} kernels traced, the last {len(good)} summarised"
        + (f" ({len(used) - len(good)} with other kernels left out)" if len(good) < len(used) else "")
        + (f"; not the step's: {', '.join(outside)}" if outside else ""),
        file=out,
    )
    print(
        f"  median step: {span:.1f} us from its first kernel's start to its last one's end, a kernel "
        f"running {busy:.1f} us of it, the GPU idle {span - busy:.1f} us ({100 * (span - busy) / span:.0f}%)",
        file=out,
    )
    print(f"  {'kernel (in order of start)':<44} {'stream':>6} {'start':>8} {'time':>8} {'idle before':>12}", file=out)
    by_label = collections.defaultdict(list)
    for _, _, rows in figures:
        for row in rows:
            by_label[row[0]].append(row)
    order = sorted(by_label, key=lambda label: median(r[2] for r in by_label[label]))
    for label in order:
        rows = by_label[label]
        print(
            f"  {label[:44]:<44} {rows[0][1]:>6} {median(r[2] for r in rows) / 1e3:>8.1f} "
            f"{median(r[3] for r in rows) / 1e3:>8.1f} {median(r[4] for r in rows) / 1e3:>12.1f}",
            file=out,
        )
    # Between the steps: only pairs of steps that follow each other, both of the step's shape.
    pairs = [f for i, f in enumerate(between_steps(steps, copies, launches)) if {i, i + 1} <= good_at]
    if not pairs:
        return span, busy, None
    period = median(f[0] for f in pairs) / 1e3
    wait = median(f[1] for f in pairs) / 1e3
    count, size, moving = (median(f[i] for f in pairs) for i in (2, 3, 4))
    print(
        f"  between steps: {period:.1f} us from one step's first kernel to the next one's (the call "
        f"period), the GPU waiting {wait:.1f} us of it for the host; copies and memsets "
        f"{count:g} a step, {size:g} bytes, {moving / 1e3:.1f} us",
        file=out,
    )
    latencies = [f[5] for f in pairs if f[5] is not None]
    if latencies:
        print(
            f"  the next step's first kernel started {median(latencies) / 1e3:.1f} us after the host "
            f"called cuGraphLaunch",
            file=out,
        )
    return span, busy, period


def self_test():
    """A made-up trace: a setup kernel, then 10 steps of k1 (8 us), two cuBLAS kernels `gemm` and
    k3 beside the second (another stream), with known gaps, each step launched as a graph and its
    outputs copied back, a memset before every other step; checks the figures."""
    import io
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "made-up.sqlite")
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT, end INT, streamId INT, shortName INT)")
    names = {"setup": 1, "k1": 2, "gemm": 3, "k3": 4}
    con.executemany("INSERT INTO StringIds VALUES (?, ?)", [(i, n) for n, i in names.items()])
    rows = [(0, 5_000, 7, names["setup"])]
    for s in range(10):
        t = 100_000 + s * 1_000_000
        rows += [
            (t, t + 8_000, 7, names["k1"]),  # 8 us
            (t + 10_000, t + 20_000, 7, names["gemm"]),  # 2 us idle before
            (t + 12_000, t + 30_000, 9, names["k3"]),  # beside it: no idle
            (t + 33_000, t + 40_000, 7, names["gemm"]),  # 3 us idle before
        ]
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, ?, ?)", rows)
    # After each step its outputs come back (a 260-byte copy, 2 us); the host clears the error
    # word before one step in two; it calls cuGraphLaunch 20 us before each step's first kernel.
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (start INT, end INT, bytes INT, copyKind INT)")
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_MEMSET (start INT, end INT, bytes INT)")
    con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INT, end INT, nameId INT)")
    con.executemany("INSERT INTO StringIds VALUES (?, ?)", [(10, "cuGraphLaunch"), (11, "cuStreamSynchronize")])
    steps_at = [100_000 + s * 1_000_000 for s in range(10)]
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY VALUES (?, ?, ?, 2)", [(t + 50_000, t + 52_000, 260) for t in steps_at])
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_MEMSET VALUES (?, ?, 4)", [(t - 5_000, t - 4_000) for t in steps_at[1::2]])
    api = [(t - 20_000, t - 15_000, 10) for t in steps_at] + [(t + 41_000, t + 53_000, 11) for t in steps_at]
    con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?)", api)
    con.commit()
    kernels = read_kernels(path)
    steps, outside = cut_into_steps(kernels)
    assert outside == ["setup"], outside
    assert len(steps) == 10 and all(len(s) == 4 for s in steps), [len(s) for s in steps]
    span, busy, per_kernel = step_figures(steps[3])
    assert (span, busy) == (40_000, 35_000), (span, busy)
    assert [(r[0], r[2], r[3], r[4]) for r in per_kernel] == [
        ("k1", 0, 8_000, 0),
        ("gemm", 10_000, 10_000, 2_000),
        ("k3", 12_000, 18_000, 0),
        ("gemm #2", 33_000, 7_000, 3_000),
    ], per_kernel
    copies, launches = read_host_side(path)
    assert len(copies) == 15 and launches == [t - 20_000 for t in steps_at], (copies, launches)
    pairs = between_steps(steps, copies, launches)
    # After step 2: its outputs' copy back, then the memset before step 3; after step 3, the copy.
    assert pairs[2] == (1_000_000, 960_000, 2, 264, 3_000, 20_000), pairs[2]
    assert pairs[3] == (1_000_000, 960_000, 1, 260, 2_000, 20_000), pairs[3]
    text = io.StringIO()
    assert summarise(kernels, "made-up", text, copies, launches) == (40.0, 35.0, 1000.0)
    assert "the GPU idle 5.0 us (12%)" in text.getvalue(), text.getvalue()
    assert "not the step's: setup" in text.getvalue(), text.getvalue()
    assert "the GPU waiting 960.0 us of it for the host" in text.getvalue(), text.getvalue()
    assert "started 20.0 us after the host called cuGraphLaunch" in text.getvalue(), text.getvalue()
    # Without the host's tables (an older trace), the kernels' figures alone.
    text = io.StringIO()
    assert summarise(kernels, "made-up", text)[:2] == (40.0, 35.0)
    assert "copies and memsets 0 a step" in text.getvalue() and "cuGraphLaunch" not in text.getvalue()
    print("timeline.py self-test: ok")


def main(argv):
    if argv[1:] == ["--self-test"]:
        return self_test()
    if len(argv) < 2:
        raise SystemExit("usage: timeline.py TRACE.sqlite [TITLE] | timeline.py --self-test")
    copies, launches = read_host_side(argv[1])
    summarise(read_kernels(argv[1]), argv[2] if len(argv) > 2 else argv[1], sys.stdout, copies, launches)


if __name__ == "__main__":
    main(sys.argv)
