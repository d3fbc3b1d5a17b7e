"""Starting ``rl-pg`` as a terminal would, for the Ctrl-C tests."""

import sys

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
