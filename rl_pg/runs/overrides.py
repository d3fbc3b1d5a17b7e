"""Config overrides from the command line: ``--lr 1e-3 --num-envs 64`` -> a config.

:func:`overrides_from_argv` turns argv into ``{name: text}``; :func:`parse_overrides`
parses each text to its field's type; :func:`make_config` builds the validated
config of a registered algorithm. :func:`sweep_values` reads one sweep option's
comma-separated values (``--lr 1e-3,3e-4``).
"""

import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from rl_pg.algos import registry


def config_class(algo: str) -> type:
    """The config dataclass of ``algo`` (a name in ``rl_pg.algos.registry``)."""
    return registry.get(algo).config_cls


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_value(text: str, hint: Any, name: str) -> Any:
    """Parse ``text`` as type ``hint`` (int, float, bool, str, tuples, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_value(text, inner, name)
    if origin is tuple:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(p, args[0], name) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"--{name} takes {len(args)} comma-separated values")
        return tuple(_parse_value(p, a, name) for p, a in zip(parts, args, strict=True))
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"--{name} takes true or false, got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            value = float(text)  # "1e6"
            if not value.is_integer():
                raise ValueError(f"--{name} takes an int, got {text!r}") from None
            return int(value)
    if hint is float:
        return float(text)
    if hint is str:
        return text
    raise ValueError(f"--{name}: cannot parse values of type {hint}")


def parse_overrides(config_cls: type, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Typed config fields from ``{"num-envs": "64", "lr": "1e-3", ...}``.

    Keys may use dashes or underscores; string values are parsed to the field's
    type (ints accept ``1e6``, bools ``true/false``, tuples ``64,64``, optional
    fields ``none``); non-string values are passed through.

    Raises:
      ValueError: for an unknown field or an unparsable value.
    """
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    parsed = {}
    for key, value in overrides.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in fields:
            known = ", ".join("--" + f.replace("_", "-") for f in sorted(fields))
            raise ValueError(
                f"Unknown option --{key.lstrip('-')} for {config_cls.__name__}; "
                f"known options: {known}"
            )
        if isinstance(value, str):
            try:
                value = _parse_value(value, hints[name], name)
            except ValueError as error:
                raise ValueError(
                    f"--{name.replace('_', '-')}: cannot parse {value!r}: {error}"
                ) from None
        parsed[name] = value
    return parsed


def make_config(algo: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """``algo``'s config with the defaults replaced by ``overrides`` (validated)."""
    config_cls = config_class(algo)
    return config_cls(**parse_overrides(config_cls, overrides or {}))


def config_from_saved(algo: str, saved: Mapping[str, Any], overrides=None) -> Any:
    """The config of a run's ``config.json`` (``saved["config"]``), with
    ``overrides`` on top (lists read back as tuples)."""
    config_cls = config_class(algo)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return config_cls(**{**fields, **parse_overrides(config_cls, overrides or {})})


def _attributes(doc: str) -> dict[str, str]:
    """``{name: text}`` of a Google-style docstring's ``Attributes:`` section
    (``a, b: text`` documents both)."""
    docs: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in inspect.cleandoc(doc).splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        field = re.match(r"^  (\w+(?:, \w+)*): (.*)$", line)
        if inside and field:
            names = field[1].split(", ")
            docs.update(dict.fromkeys(names, field[2].strip()))
        elif inside and line.startswith("    ") and names:
            docs.update({n: docs[n] + " " + line.strip() for n in names})
        else:  # the section's end, or an aside at the fields' indent
            names = []
            inside = inside and line.startswith("  ")
    return docs


def field_docs(config_cls: type) -> dict[str, str]:
    """What each field of ``config_cls`` does, from the ``Attributes:`` sections
    of its docstring and its bases' (the most derived class that documents a
    field wins)."""
    docs: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        docs.update(_attributes(cls.__dict__.get("__doc__") or ""))
    return docs


def config_help(algo: str) -> str:
    """Every config field of ``algo``: ``--name TYPE (default: value)``, then what
    it does (from the config classes' docstrings)."""
    config_cls = config_class(algo)
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    lines = [
        f"{config_cls.__name__} fields of --algo {algo} (set one with --name VALUE; "
        "sweepable ones take v1,v2,... in rl-pg sweep):"
    ]
    for field in dataclasses.fields(config_cls):
        hint = hints[field.name]
        hint = hint.__name__ if isinstance(hint, type) else str(hint)
        option = "--" + field.name.replace("_", "-")
        swept = ", sweepable" if field.name in config_cls.SWEEPABLE else ""
        lines.append(f"  {option} {hint} (default: {field.default!r}{swept})")
        lines += textwrap.wrap(
            docs.get(field.name, "(undocumented)"),
            width=80,
            initial_indent="      ",
            subsequent_indent="      ",
        )
    return "\n".join(lines)


def overrides_from_argv(argv: Sequence[str]) -> dict[str, str]:
    """``["--lr", "1e-3", "--anneal-lr", "--hidden=32,32"]`` -> overrides.

    A flag followed by another flag (or by nothing) means ``true``.

    Raises:
      ValueError: for a value that does not follow a ``--name``.
    """
    out: dict[str, str] = {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"Expected an option --name, got {token!r}")
        if "=" in token:
            name, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            name, value = token[2:], argv[i + 1]
            i += 2
        else:
            name, value = token[2:], "true"
            i += 1
        out[name] = value
    return out
