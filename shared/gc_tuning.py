"""Garbage-collector settings for the long-running service processes.

Under batch-80 load, Python's cyclic garbage collector took about a tenth of the CPU of the gateway and
the workers (perf): every request builds thousands of short-lived containers, which triggered
young-generation collections many times per request, and the older generations were rescanned with the
whole heap the imports left behind (scikit-learn, scipy, celery). Freezing that start-up heap takes it
out of every later collection, and a higher young-generation threshold collects less often; reference
counting still frees almost everything at once. Measured with `bench.cpu_breakdown`: 19.6-21.9 against
22.3-23.0 CPU ms per 80-row request (README, Benchmarks).
"""

from __future__ import annotations

import gc

# Allocations (net of deallocations) between young-generation collections (CPython's default: 700),
# and young/middle collections between collections of the next generation (default: 10 and 10).
YOUNG_THRESHOLD = 10_000
OLDER_THRESHOLDS = (50, 50)


def tune_garbage_collector() -> None:
    """Freeze everything allocated so far (start-up) and collect the young generation less often.

    Call once a service process has finished starting (imports, models, connections); in a forked pool
    child again after the fork, for what the child built.
    """
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
