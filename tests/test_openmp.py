"""kernels/openmp.py: a thread's OpenMP workers end when it releases its pool."""

import os
import sys
import threading

import pytest
import torch

from draftwise.kernels.openmp import release_thread_pool


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_release_ends_the_calling_threads_workers():
    seen = {}

    def work():
        torch.set_num_threads(2)  # this thread's team: one worker besides itself
        a = torch.randn(512, 512)
        for _ in range(3):
            a = (a @ a).tanh()
        seen["with_pool"] = os_threads()
        seen["released"] = release_thread_pool()
        seen["after"] = os_threads()
        (a @ a).sum()  # torch still works: the next parallel op starts a new pool
        seen["again"] = os_threads()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["released"] is True
    assert seen["after"] < seen["with_pool"]
    assert seen["again"] > seen["after"]
