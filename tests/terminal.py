"""Starting ``rl-pg`` as a terminal would, and pressing Ctrl-C, for the Ctrl-C tests."""

import re
import signal
import subprocess
import sys
from pathlib import Path

# pytest-xdist workers ignore SIGINT and a child inherits that (Python then
# installs no KeyboardInterrupt handler). Restoring it in the child itself
# avoids a ``preexec_fn``, which runs Python after fork() in a multithreaded
# (JAX) process and may deadlock.
_LAUNCH = (
    "import runpy, signal; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('rl_pg.cli', run_name='__main__', alter_sys=True)"
)


def rl_pg_argv(*args: str) -> list[str]:
    """argv that runs ``rl-pg *args`` with a terminal's Ctrl-C."""
    return [sys.executable, "-c", _LAUNCH, *args]


def press_ctrl_c(proc: subprocess.Popen, stderr_log: Path, presses: int = 5) -> int:
    """Ctrl-C, pressed again (every 5 s, as a user would) while ``proc`` runs on without
    having said "interrupted" on stderr; returns its exit status.

    Once in a while a Ctrl-C is lost inside JAX, not rl_pg: a KeyboardInterrupt
    raised while JAX traces can land in one of its bare ``except:`` blocks
    (``jax._src.core``'s ``operator.index`` probes) or in its gc callback, which
    swallow it (1 SIGINT in 40 at random times during ``jax.make_jaxpr``; CI
    saw a run train to the end after one). The gc callback's case prints
    "Exception ignored" and a traceback: see :func:`without_jax_gc_noise`.
    """
    assert proc.poll() is None, f"ended before Ctrl-C:\n{stderr_log.read_text()}"
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=5)  # a compile in C++ first
        except subprocess.TimeoutExpired:
            if "interrupted" in stderr_log.read_text():
                break  # heard: it is cleaning up
    return proc.wait(timeout=120)


_JAX_GC_NOISE = re.compile(
    r"Exception ignored in: <function _xla_gc_callback[^\n]*\n"
    r"Traceback \(most recent call last\):\n(?:[ \t][^\n]*\n)*KeyboardInterrupt:? *\n"
)


def without_jax_gc_noise(stderr: str) -> str:
    """``stderr`` less what Python prints when JAX's gc callback swallows a
    Ctrl-C (its traceback is JAX's, not rl-pg's)."""
    return _JAX_GC_NOISE.sub("", stderr)
