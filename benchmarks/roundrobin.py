"""Round-robin timing for the interleaved benchmark tests."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_round_robin(benchmark, runs: dict[str, Callable[[], None]], rounds: int) -> tuple[dict, dict]:
    """Calls every function of ``runs`` once per round, in order, for ``rounds`` rounds under
    ``benchmark.pedantic``, each call timed on its own (each is called once first, as a warm-up).
    Returns the median and the best milliseconds of each, by name."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}

    def one_round():
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    best = {name: min(t) * 1e3 for name, t in times.items()}
    return median, best
