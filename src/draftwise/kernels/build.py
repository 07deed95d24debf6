"""Builds the package's C kernels on first use and loads them with ctypes.

Each kernel is one C file beside this module. It is compiled with the system C compiler
(`$CC`, else `cc`) into the draftwise cache (`~/.cache/draftwise/kernels`, or under
`$DRAFTWISE_CACHE`), named by a hash of the source, the compiler and the flags, so an
edited source or another compiler builds afresh and a later process loads the file in
milliseconds. Where no compiler works, `load` raises `KernelUnavailable` with the
compiler's own message, and the caller says what to use instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from draftwise.paths import cache_root

FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-Wall")


class KernelUnavailable(RuntimeError):
    """A kernel could not be built or loaded here; the message says why."""


@cache
def load(name: str) -> ctypes.CDLL:
    """The compiled kernel `<name>.c` (built into the cache if missing)."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C compiler found ({compiler!r}; set $CC) to build the {name} kernel")
    key = hashlib.sha256(source.read_bytes() + compiler.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{name}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            run = subprocess.run([compiler, *FLAGS, "-o", str(built), str(source), "-lm"], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                message = (run.stderr or run.stdout).strip().splitlines()
                raise KernelUnavailable(f"building the {name} kernel failed: {message[0] if message else 'no output'}")
            os.replace(built, target)  # atomic: a concurrent process sees the whole file or none
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise KernelUnavailable(f"loading the {name} kernel failed: {e}") from None
