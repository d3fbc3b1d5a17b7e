"""Policy checkpoints: parameters plus what is needed to rebuild policy and env.

A checkpoint is a directory holding ``params.msgpack`` (flax serialization) and
``meta.json`` (policy factory and its arguments, env id and overrides, anything
else the writer adds). Both are written atomically (temporary file, then
rename), so an interrupted write never leaves a half checkpoint behind.
"""

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import serialization

import rl_pg
from rl_pg import io, policies

PARAMS_FILE, META_FILE = "params.msgpack", "meta.json"
_FACTORIES = {"mlp": policies.mlp_policy, "cnn": policies.cnn_policy}


def save_policy(
    directory: str | Path,
    params: Any,
    *,
    policy: dict[str, Any],
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write a policy checkpoint.

    Args:
      directory: created if missing; existing checkpoint files are replaced
        atomically.
      params: the policy parameters (a pytree of arrays).
      policy: ``{"kind": "mlp" | "cnn", **factory_kwargs}`` for
        :func:`rl_pg.policies.mlp_policy` / ``cnn_policy``.
      env_id, env_kwargs: the environment it acts in (``rl_pg.make`` arguments).
      **extra: JSON-serialisable metadata (training step, score, ...).
    """
    if policy.get("kind") not in _FACTORIES:
        raise ValueError(f"policy['kind'] must be one of {list(_FACTORIES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(params)
    io.atomic_write_bytes(directory / PARAMS_FILE, serialization.to_bytes(params))
    meta = {"policy": policy, "env_id": env_id, "env_kwargs": env_kwargs or {}, **extra}
    io.write_json(directory / META_FILE, meta)
    return directory


def load_policy(directory: str | Path):
    """Read a checkpoint: ``(policy, params, env, env_params, meta)``."""
    directory = Path(directory)
    for name in (PARAMS_FILE, META_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory} is not a policy checkpoint (missing {name})"
            )
    meta = json.loads((directory / META_FILE).read_text())
    spec = dict(meta["policy"])
    kind = spec.pop("kind")
    policy = _FACTORIES[kind](**spec)
    env, env_params = rl_pg.make(meta["env_id"], **meta.get("env_kwargs", {}))
    raw = serialization.msgpack_restore((directory / PARAMS_FILE).read_bytes())
    params = jax.tree.map(jnp.asarray, raw)
    return policy, params, env, env_params, meta


def load_act_fn(directory: str | Path, greedy: bool = True):
    """``(act_fn(obs, state, key) -> action, env, env_params)`` of a checkpoint."""
    policy, params, env, env_params, _ = load_policy(directory)

    def act_fn(obs, state, key):
        logits, _ = policy.apply(params, obs)
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    return act_fn, env, env_params
