import gc
import os
import signal
import sys

import pytest

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference_driver.py


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # no /proc (not Linux)
        return 0


def _map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


MAP_LIMIT = _map_limit()


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """XLA:CPU maps every kernel it compiles into memory of its own (about three
    mappings a kernel: ~2,800 for a small PPO chunk and its update), and a
    worker that compiles thousands of programs reaches the kernel's
    ``vm.max_map_count`` (65,530): the next kernel then fails to load and the
    worker dies (a segfault at address 0). Past half the limit, drop jax's
    caches after the test (their programs are compiled again when needed)."""
    yield
    if MAP_LIMIT and _count_lines("/proc/self/maps") > MAP_LIMIT // 2:
        import jax

        for array in jax.live_arrays():
            array.block_until_ready()  # nothing in flight on a freed program
        jax.clear_caches()
        gc.collect()


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal (a test
    worker may have set it otherwise); the handler is restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
