"""Counting XLA compilations in tests (issue 25: no recompilation across calls
that differ only in data)."""

import logging

import jax


def compiles(fn, caplog) -> list[str]:
    """Messages of the XLA compilations that ``fn()`` triggers."""
    caplog.clear()
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            fn()
    finally:
        jax.config.update("jax_log_compiles", False)
    return [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
