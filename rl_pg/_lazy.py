"""Public names loaded on first use (PEP 562), so that ``import rl_pg`` (and the
``rl-pg`` command's ``--help``) costs no JAX import."""

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Mapping


def attributes(
    package: str, names: Mapping[str, str], namespace: dict
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps each public name
    to the module that defines it (the value is cached in ``namespace``)."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(names[name])
        value = (
            module if module.__name__ == f"{package}.{name}" else getattr(module, name)
        )
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__


class _GymnaxHook(importlib.abc.MetaPathFinder):
    """On the first ``import gymnax``, once gymnax has loaded, import
    :mod:`rl_pg.envs` (which registers the Flappy Bird ids with gymnax)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "gymnax":
            return None
        sys.meta_path.remove(self)  # one use; the real finders locate gymnax
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):
            run(module)
            del loader.exec_module  # back to the loader's own method
            importlib.import_module("rl_pg.envs")

        loader.exec_module = exec_module
        return spec


def register_envs_with_gymnax() -> None:
    """Register the Flappy Bird ids with gymnax now if it is loaded, else as soon
    as it is imported (``gymnax.make("FlappyBird-v0")`` after ``import rl_pg``)."""
    if "gymnax" in sys.modules:
        importlib.import_module("rl_pg.envs")
    elif not any(isinstance(f, _GymnaxHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _GymnaxHook())
