"""Flappy Bird environments and their registry.

``rl_pg.make(env_id, **kwargs)`` returns ``(env, params)``; importing rl_pg also
registers the ids with gymnax, so ``gymnax.make(env_id)`` works.
"""

import dataclasses
import math
import numbers
from typing import Any

import gymnax

from rl_pg.envs.flappy_bird import (
    EnvParams,
    EnvState,
    FlappyBird,
    crashed,
    features,
    gap_top,
    validate_params,
)
from rl_pg.envs.levels import level_seed

ENV_IDS = {
    "FlappyBird-v0": "features",
    "FlappyBird-lidar-v0": "lidar",
    "FlappyBird-pixels-v0": "pixels",
}
_STATIC_KWARGS = ("num_rays", "pixel_shape")
_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(EnvParams))
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(EnvParams)}
_INT32 = (-(2**31), 2**31 - 1)


def _check_scalar(name: str, value: Any) -> str | None:
    """A problem with a Python / numpy scalar override, or None (arrays pass:
    ``validate_params`` checks them and they may be traced)."""
    if hasattr(value, "shape") and not isinstance(value, numbers.Number):
        return None
    kind = _FIELD_TYPES[name]
    if kind in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{name} must be an int, got {value!r}"
        if isinstance(value, numbers.Integral) or (
            math.isfinite(value) and float(value).is_integer()
        ):
            if not _INT32[0] <= int(value) <= _INT32[1]:
                return (
                    f"{name} must fit int32 [{_INT32[0]}, {_INT32[1]}], got {value!r}"
                )
            return None
        return f"{name} must be an int, got {value!r}"
    if kind in (float, "float"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{name} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{name} must be finite, got {value!r}"
    if kind in (bool, "bool") and not isinstance(value, bool | numbers.Integral):
        return f"{name} must be a bool, got {value!r}"
    return None


def make(env_id: str, **kwargs: Any) -> tuple[FlappyBird, EnvParams]:
    """Build a Flappy Bird environment and its (validated) default parameters.

    Args:
        env_id: one of ``ENV_IDS``.
        **kwargs: ``num_rays`` / ``pixel_shape`` (static, set shapes) or any
            :class:`EnvParams` field (physics, rewards, ``max_steps_in_episode``).

    Raises:
        ValueError: for an unknown id, an unknown keyword or an invalid value,
            before anything is compiled.
    """
    if env_id not in ENV_IDS:
        raise ValueError(f"Unknown env id {env_id!r}; rl_pg provides {sorted(ENV_IDS)}")
    unknown = set(kwargs) - _PARAM_FIELDS - set(_STATIC_KWARGS)
    if unknown:
        raise ValueError(
            f"Unknown keyword(s) {sorted(unknown)} for {env_id}; expected "
            f"{list(_STATIC_KWARGS)} or EnvParams fields {sorted(_PARAM_FIELDS)}"
        )
    problems = [
        p
        for k, v in kwargs.items()
        if k in _PARAM_FIELDS and (p := _check_scalar(k, v)) is not None
    ]
    if problems:
        raise ValueError(f"Invalid parameters for {env_id}: " + "; ".join(problems))
    static = {k: kwargs[k] for k in _STATIC_KWARGS if k in kwargs}
    env = FlappyBird(obs_mode=ENV_IDS[env_id], **static)
    overrides = {
        k: int(v) if _FIELD_TYPES[k] in (int, "int") and isinstance(v, float) else v
        for k, v in kwargs.items()
        if k in _PARAM_FIELDS
    }
    params = validate_params(env.default_params.replace(**overrides))
    return env, params


def _register_with_gymnax() -> None:
    for env_id, mode in ENV_IDS.items():
        if env_id not in gymnax.registered_envs:
            gymnax.register(env_id, lambda mode=mode, **kw: FlappyBird(mode, **kw))


_register_with_gymnax()

__all__ = [
    "ENV_IDS",
    "EnvParams",
    "EnvState",
    "FlappyBird",
    "crashed",
    "features",
    "gap_top",
    "level_seed",
    "make",
    "validate_params",
]
