"""The peers' timing rule, the same as `cargo bench --bench steps`: three warm-up steps, then steps
for `seconds` (at least ten), and the median in milliseconds."""
import time


def median_ms(step, seconds=2.0):
    for _ in range(3):
        step()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]
