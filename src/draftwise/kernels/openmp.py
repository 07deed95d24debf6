"""OpenMP worker pools: one per thread that runs parallel torch ops, and why that matters.

Every thread that runs a parallel torch op (or one of our kernels) gets its own OpenMP
team: `threads - 1` worker threads that live as long as the thread. GNU OpenMP (the
runtime torch's Linux wheels ship) lets idle workers spin a while before they sleep, so
the next parallel region starts at once; but when the process holds more OpenMP threads
than it has CPUs it spins only briefly, and every op of a forward pass then waits for its
workers to be woken from a futex. Measured on a 2-core EPYC: smollm2 decodes at 22 ms per
token with one pool, 31-32 ms once a second thread (loading on the main thread, decoding
on an engine thread) holds a pool of its own, and 23 ms again after that one is released.

`release_thread_pool()` ends the calling thread's workers (OpenMP 5.0's
`omp_pause_resource_all(omp_pause_hard)`: a thread's pool only, the next parallel op on
that thread starts a new one). A thread that is done with torch for a while calls it so
that the thread doing the work has the only pool: the server's loading thread before the
engine thread starts, a trainer thread between steps.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger("draftwise")

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the threads and their resources
RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel, LLVM OpenMP


@functools.lru_cache(maxsize=1)
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (None: none found, or not one with omp_pause_resource_all)."""
    import torch  # noqa: F401 - loads the runtime

    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f if "/" in line]
    except OSError:  # not Linux
        paths = []
    for path in dict.fromkeys(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(RUNTIMES):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if hasattr(lib, "omp_pause_resource_all"):
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                lib.omp_pause_resource_all.restype = ctypes.c_int
                return lib
    return None


def release_thread_pool() -> bool:
    """End the calling thread's OpenMP workers; True when the runtime did (False where it
    cannot: no known runtime loaded, or this thread is inside a parallel region)."""
    lib = _runtime()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(OMP_PAUSE_HARD) == 0
