"""Policy checkpoints: parameters plus what is needed to rebuild policy and env.

A checkpoint is a directory holding ``params.msgpack`` (flax serialization) and
``meta.json`` (policy factory and its arguments, env id and overrides, anything
else the writer adds). Both are written atomically (temporary file, then
rename), so an interrupted write never leaves a half checkpoint behind.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from rl_pg import envs, io, policies
from rl_pg.envs import ENV_IDS, scored

PARAMS_FILE, META_FILE = "params.msgpack", "meta.json"
_FACTORIES = {"mlp": policies.mlp_policy, "cnn": policies.cnn_policy}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or inconsistent (names the file)."""


def save_policy(
    directory: str | Path,
    params: Any,
    *,
    policy: dict[str, Any],
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write a policy checkpoint, atomically as a whole.

    Both files are written into a temporary directory beside ``directory``,
    which is then renamed onto it (an existing checkpoint is moved aside first
    and removed after), so a reader finds the old checkpoint, the new one or
    (for an instant while one replaces another) none, never a mix or a part.

    Args:
      directory: the checkpoint directory; an existing checkpoint is replaced.
      params: the policy parameters (a pytree of arrays).
      policy: ``{"kind": "mlp" | "cnn", **factory_kwargs}`` for
        :func:`rl_pg.policies.mlp_policy` / ``cnn_policy``.
      env_id, env_kwargs: the environment it acts in (``rl_pg.make`` arguments).
      **extra: JSON-serialisable metadata (training step, score, ...).
    """
    if policy.get("kind") not in _FACTORIES:
        raise ValueError(f"policy['kind'] must be one of {list(_FACTORIES)}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(params)
    meta = {"policy": policy, "env_id": env_id, "env_kwargs": env_kwargs or {}, **extra}
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        io.atomic_write_bytes(tmp / PARAMS_FILE, serialization.to_bytes(params))
        io.write_json(tmp / META_FILE, meta)
        os.chmod(tmp, 0o755)
        old = None
        if directory.exists():
            old = Path(
                tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old.")
            )
            os.replace(directory, old)  # onto the empty temporary directory
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def find_policy_checkpoint(path: str | Path) -> Path | None:
    """The policy checkpoint in ``path``: itself, or a run's ``checkpoints/best``."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "best", path / "best"):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


RUN_HINT = (
    "pass a training run directory (config.json and checkpoints/), its checkpoints/ "
    "directory, or a checkpoint (a directory with meta.json and params.msgpack, or "
    "a single-file checkpoint such as a Q-table's best.npz)"
)


def _best_in(directory: Path) -> Path | None:
    """What an algorithm's ``save(directory / "best")`` wrote: ``best`` (a policy
    directory) or ``best.<suffix>`` (a single file)."""
    if (directory / "best").is_dir():
        return directory / "best"
    files = sorted(p for p in directory.glob("best.*") if p.is_file())
    return files[0] if files else None


def _saved_config(run: Path) -> dict:
    """A run's ``config.json`` ({} if unreadable)."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _run_algo(run: Path) -> str:
    """The ``algo`` that a run's ``config.json`` records (``ALGO`` if unreadable)."""
    algo = _saved_config(run).get("algo")
    return algo if isinstance(algo, str) else "ALGO"


def sweep_hint(path: Path) -> str | None:
    """If ``path`` holds an ``rl-pg sweep`` (its ``config.json`` lists cells), what
    to pass instead: one of its runs."""
    if "cells" not in _saved_config(path):
        return None
    runs = sorted(p.name for p in path.glob("cell_*_seed_*") if p.is_dir())
    example = f" ({path / runs[0]}, ...)" if runs else ""
    return f"{path} holds an rl-pg sweep: pass one of its runs, cell_*_seed_*{example}"


def policy_dir(path: str | Path) -> Path:
    """The policy checkpoint that ``path`` names (for ``eval``, ``render``, the study).

    * a checkpoint passes through: a directory holding ``meta.json`` or
      ``params.msgpack``, or a file (a single-file checkpoint, e.g. a Q-table);
    * a training run directory (``config.json`` and ``checkpoints/``), or its
      ``checkpoints/`` directory: its best policy, ``checkpoints/best`` (or
      ``checkpoints/best.<suffix>``, what the algorithm's ``save`` wrote).

    Raises:
      CheckpointError: ``path`` is missing, a run without a best policy yet, or
        neither (the message says what to pass).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} is neither a policy checkpoint nor a training run directory "
            f"(it does not exist); {RUN_HINT}"
        )
    if path.is_file() or any((path / f).is_file() for f in (META_FILE, PARAMS_FILE)):
        return path
    for checkpoints in (path / "checkpoints", path):
        best = _best_in(checkpoints) if checkpoints.is_dir() else None
        if best is not None:
            return best
    if (hint := sweep_hint(path)) is not None:
        raise CheckpointError(hint)
    if (path / "config.json").is_file():
        raise CheckpointError(
            f"training run {path} has no best policy yet (checkpoints/best is "
            "missing: it stopped before its first evaluation); finish it with "
            f"rl-pg train --algo {_run_algo(path)} --resume --out {path}"
        )
    raise CheckpointError(
        f"{path} is neither a policy checkpoint nor a training run directory; "
        + RUN_HINT
    )


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, checked for the fields a loader needs.

    Raises:
      CheckpointError: naming the file that is missing or malformed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    for name in (META_FILE, PARAMS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} is not a policy checkpoint (missing {name})"
            )
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    spec = meta.get("policy")
    if not isinstance(spec, dict) or spec.get("kind") not in _FACTORIES:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise CheckpointError(
            f"{path}: unknown policy kind {kind!r}; expected one of {list(_FACTORIES)}"
        )
    if not isinstance(meta.get("env_id"), str):
        raise CheckpointError(f"{path}: env_id missing or not a string")
    if not isinstance(meta.get("env_kwargs", {}), dict):
        raise CheckpointError(f"{path}: env_kwargs must be a JSON object")
    return meta


def _shapes(tree: Any) -> dict[str, str]:
    """``{"['params']['Dense_0']['kernel']": "float32[12, 64]", ...}``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(k): f"{np.dtype(v.dtype)}{list(np.shape(v))}"
        if hasattr(v, "dtype")
        else type(v).__name__
        for k, v in leaves
    }


def _first_difference(expected: dict, found: dict) -> str:
    for key in sorted(set(expected) | set(found)):
        if expected.get(key, "missing") != found.get(key, "missing"):
            return (
                f"params{key}: expected {expected.get(key, 'missing')}, "
                f"found {found.get(key, 'missing')}"
            )
    return "same leaves"


def _make_env(env_id: str, env_kwargs: dict):
    """Flappy Bird from ``rl_pg.make``; any other gymnax id scored by its episode
    return (:mod:`rl_pg.envs.scored`), as training made it."""
    if env_id in ENV_IDS or env_id not in gymnax.registered_envs:
        return envs.make(env_id, **env_kwargs)  # an unknown id: rl_pg's message
    return scored.make(env_id, **env_kwargs)


def load_policy(directory: str | Path):
    """Read a checkpoint: ``(policy, params, env, env_params, meta)``.

    The parameters are checked against the policy that ``meta.json`` describes
    (same tree, shapes and dtypes), before anything is compiled.

    Raises:
      CheckpointError: a missing, truncated or foreign file, an unknown policy
        kind or environment, or parameters that do not fit the policy; the
        message names the file.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    meta_path, params_path = directory / META_FILE, directory / PARAMS_FILE
    spec = dict(meta["policy"])
    kind = spec.pop("kind")
    try:
        policy = _FACTORIES[kind](**spec)
        env, env_params = _make_env(meta["env_id"], meta.get("env_kwargs", {}))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{meta_path}: {error}") from None
    try:
        raw = serialization.msgpack_restore(params_path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated types
        raise CheckpointError(
            f"{params_path} is not a readable parameter file ({error})"
        ) from None
    space = env.observation_space(env_params)
    obs = jax.ShapeDtypeStruct(space.shape, space.dtype)
    expected = _shapes(jax.eval_shape(policy.init, jax.random.PRNGKey(0), obs))
    found = _shapes(raw) if isinstance(raw, dict) else {}
    if found != expected:
        raise CheckpointError(
            f"{params_path} does not hold the parameters of the policy in "
            f"{meta_path} ({meta['policy']}): {_first_difference(expected, found)}"
        )
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
