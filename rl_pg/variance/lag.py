"""Policy lag: target policies pi_theta at a controlled distance from a behaviour mu.

The study measures estimators on data from mu while the gradient asked for is grad J
at a target theta (REFERENCE.md section 13). This module builds the targets and
measures how stale mu's data is for them:

* :func:`staleness`: the mean per-step KL(mu || pi) on mu's own states, exact over
  actions, the largest ratio pi/mu on taken actions and Kish effective sample sizes
  (:func:`kish_ess`) of the trajectory and per-step importance weights;
* :func:`lag_direction` and :func:`targets_at_kl`: theta = mu + alpha d along PPO's
  first-epoch update direction d, alpha found by bisection for each KL level
  (``rl-pg variance --lag-kl``);
* :func:`checkpoint_pairs`: real training lag, checkpoint t as behaviour and t + K as
  target (``rl-pg variance --run RUN_DIR --lag-checkpoints K``);
* :func:`save_target`: each target as a policy checkpoint (``rl-pg variance
  --checkpoints`` reads it);
* :func:`exact_off_policy` and :func:`exact_gradient`: on the enumerable MDP, the exact
  mean and variance of a per-trajectory estimator on mu's data, and the truth grad J
  at the target.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rl_pg import checkpoint, enumerable, estimators
from rl_pg.runs import files
from rl_pg.trajectory import Trajectory

Params = Any
ApplyFn = Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]
Sampler = Callable[[jax.Array, Params, int], Trajectory]  # (key, params, n) -> [T, n]


# ------------------------------------------------------------------ staleness


class Weights(NamedTuple):
    """Importance weights of mu's batch for pi (1 on padding; log space).

    Attributes:
      log_step: [T, B] log rho_t = log pi(a_t|s_t) - log mu(a_t|s_t), 0 on padding.
      log_trajectory: [B] log rho_{0:T-1} = sum_t log rho_t over live steps.
      mask: [T, B] float32 live steps.
    """

    log_step: jax.Array
    log_trajectory: jax.Array
    mask: jax.Array


class Staleness(NamedTuple):
    """How stale mu's batch is for pi (scalars).

    Attributes:
      kl: mean over live steps of KL(mu(.|s_t) || pi(.|s_t)), exact over actions.
      max_ratio: max over live steps of rho_t = pi(a_t|s_t) / mu(a_t|s_t).
      min_ratio: min over live steps of rho_t.
      ess_trajectory: Kish ESS of the B trajectory weights rho_{0:T-1} (B at pi = mu).
      ess_step: Kish ESS of the per-step weights rho_t over live steps (their number
        at pi = mu).
      num_trajectories: B.
      num_steps: the number of live steps.
    """

    kl: jax.Array
    max_ratio: jax.Array
    min_ratio: jax.Array
    ess_trajectory: jax.Array
    ess_step: jax.Array
    num_trajectories: jax.Array
    num_steps: jax.Array


def _clean(batch: Trajectory) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(observations, actions, mask) with padding zeroed (it may be non-finite)."""
    mask = batch.mask.astype(jnp.float32)
    live = mask > 0
    obs_live = live.reshape(live.shape + (1,) * (batch.observations.ndim - 2))
    obs = jnp.where(obs_live, batch.observations, jnp.zeros_like(batch.observations))
    return obs, jnp.where(live, batch.actions, 0), mask


def _log_policies(mu_params, pi_params, apply_fn: ApplyFn, batch: Trajectory):
    """log mu(.|s_t), log pi(.|s_t) [T, B, A], actions [T, B], mask [T, B]."""
    obs, actions, mask = _clean(batch)
    log_mu = jax.nn.log_softmax(apply_fn(mu_params, obs)[0], axis=-1)
    log_pi = jax.nn.log_softmax(apply_fn(pi_params, obs)[0], axis=-1)
    return log_mu, log_pi, actions, mask


def importance_weights(
    mu_params: Params, pi_params: Params, apply_fn: ApplyFn, batch: Trajectory
) -> Weights:
    """log rho_t and log rho_{0:T-1} of a batch from mu, both policies recomputed.

    Both log-probabilities come from ``apply_fn`` (not ``batch.log_probs``), so at
    pi = mu every ratio is exactly 1.

    Args:
      mu_params, pi_params: behaviour and target params.
      apply_fn: ``apply(params, obs) -> (logits [..., A], values)``.
      batch: [T, B] episodic batch sampled from mu.

    Returns:
      ``Weights``.
    """
    log_mu, log_pi, actions, mask = _log_policies(mu_params, pi_params, apply_fn, batch)
    taken = actions[..., None]
    log_rho = (
        jnp.take_along_axis(log_pi, taken, -1) - jnp.take_along_axis(log_mu, taken, -1)
    )[..., 0]
    log_rho = jnp.where(mask > 0, log_rho, 0.0)
    return Weights(log_rho, jnp.sum(log_rho, axis=0), mask)


def kish_ess(w: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Kish's effective sample size (sum w)^2 / sum w^2 of weights w >= 0.

    Args:
      w: weights, any shape.
      mask: optional 0/1 array of w's shape; entries with mask 0 are left out.

    Returns:
      [] float; the count of entries when all weights are equal, 0 if all are 0.
    """
    w = jnp.asarray(w, jnp.float32)
    if mask is not None:
        w = jnp.where(jnp.asarray(mask) > 0, w, 0.0)
    w = w / jnp.maximum(jnp.max(w), jnp.finfo(jnp.float32).tiny)  # scale-free
    total = jnp.sum(w)
    return jnp.where(total > 0, total**2 / jnp.sum(w * w), 0.0)


def kish_ess_log(log_w: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``kish_ess(exp(log_w), mask)`` without overflow (products of many ratios)."""
    log_w = jnp.asarray(log_w, jnp.float32)
    if mask is not None:
        log_w = jnp.where(jnp.asarray(mask) > 0, log_w, -jnp.inf)
    top = jnp.max(log_w)
    return kish_ess(jnp.exp(log_w - jnp.where(jnp.isfinite(top), top, 0.0)))


@functools.partial(jax.jit, static_argnames="apply_fn")
def staleness(
    mu_params: Params, pi_params: Params, apply_fn: ApplyFn, batch: Trajectory
) -> Staleness:
    """Staleness of mu's batch for pi (REFERENCE.md section 13).

    KL(mu || pi) = mean over live steps t of sum_a mu(a|s_t) (log mu(a|s_t) -
    log pi(a|s_t)): exact over actions, averaged over mu's visited states (a Monte
    Carlo estimate of E_{s ~ d_mu}). Ratios rho_t = pi(a_t|s_t) / mu(a_t|s_t) on the
    taken actions; Kish ESS of trajectory weights prod_t rho_t and of per-step rho_t.

    Args:
      mu_params, pi_params: behaviour and target params.
      apply_fn: ``apply(params, obs) -> (logits [..., A], values)`` (static under jit).
      batch: [T, B] episodic batch sampled from mu.

    Returns:
      ``Staleness`` of jax scalars.
    """
    log_mu, log_pi, _, mask = _log_policies(mu_params, pi_params, apply_fn, batch)
    mu = jnp.exp(log_mu)
    # 0 log 0 = 0: an action mu never takes adds nothing, whatever pi gives it.
    per_state = jnp.sum(jnp.where(mu > 0, mu * (log_mu - log_pi), 0.0), axis=-1)
    live = mask > 0
    num_steps = jnp.sum(mask)
    kl = jnp.sum(jnp.where(live, per_state, 0.0)) / jnp.maximum(num_steps, 1.0)
    w = importance_weights(mu_params, pi_params, apply_fn, batch)
    return Staleness(
        kl=kl,
        max_ratio=jnp.exp(jnp.max(jnp.where(live, w.log_step, -jnp.inf))),
        min_ratio=jnp.exp(jnp.min(jnp.where(live, w.log_step, jnp.inf))),
        ess_trajectory=kish_ess_log(w.log_trajectory),
        ess_step=kish_ess_log(w.log_step, mask),
        num_trajectories=jnp.asarray(mask.shape[1], jnp.float32),
        num_steps=num_steps,
    )


# ------------------------------------------------------------ targets at a KL


@dataclasses.dataclass(frozen=True)
class LagConfig:
    """How targets are built (:func:`lag_direction`, :func:`targets_at_kl`).

    Attributes:
      direction_batch: trajectories of the batch whose PPO gradient is the direction.
      eval_batch: trajectories of the fixed batch from mu on which KL is measured.
      gamma, lam: GAE parameters of the PPO direction (the study's SuiteConfig's).
      clip_eps: PPO's clip (inactive at r = 1; kept for the record).
      initial_step: first alpha tried when bracketing a level (parameter-norm units).
      max_step: the largest alpha tried; a level not reached by then is an error.
      rel_tol: each achieved KL is within rel_tol * level of its level.
      max_bisections: bisection steps per level before giving up.
    """

    direction_batch: int = 64
    eval_batch: int = 64
    gamma: float = 0.99
    lam: float = 0.95
    clip_eps: float = 0.2
    initial_step: float = 0.1
    max_step: float = 1e3
    rel_tol: float = 1e-3
    max_bisections: int = 60

    def __post_init__(self):
        for name in ("direction_batch", "eval_batch", "max_bisections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"LagConfig.{name} must be a positive int, got {value!r}"
                )
        for name in ("initial_step", "max_step", "rel_tol"):
            value = getattr(self, name)
            if not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise ValueError(
                    f"LagConfig.{name} must be finite and > 0, got {value!r}"
                )
        if self.initial_step > self.max_step:
            raise ValueError(
                f"LagConfig.initial_step={self.initial_step} exceeds "
                f"max_step={self.max_step}"
            )


class LagTarget(NamedTuple):
    """A target policy at a KL level.

    Attributes:
      params: pi_theta's params, theta = mu + step * d (mu's own params at level 0).
      level: the KL level asked for.
      kl: the KL(mu || pi) achieved on the evaluation batch.
      max_ratio: the largest pi/mu on the evaluation batch's taken actions.
      step: alpha, the distance from mu along the unit direction d.
      staleness: the full ``Staleness`` on the evaluation batch (Python floats).
    """

    params: Params
    level: float
    kl: float
    max_ratio: float
    step: float
    staleness: Staleness


def _jit_sample(sample: Sampler) -> Sampler:
    """``sample`` compiled (n static): rollouts run eagerly op by op otherwise."""
    return jax.jit(sample, static_argnums=2)


def _global_norm(tree: Params) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def lag_direction(
    key: jax.Array,
    mu_params: Params,
    apply_fn: ApplyFn,
    sample: Sampler,
    config: LagConfig = LagConfig(),
) -> Params:
    """PPO's first-epoch update direction at mu, as a unit vector d (a params pytree).

    d = -grad L / ||grad L||_2, L the PPO clipped surrogate (``ppo_clip``, Schulman
    et al. 2017) on one batch of ``config.direction_batch`` trajectories sampled from
    mu with ``key``: at r = 1 the clip is inactive, so grad L = -(1/B) sum_i sum_t
    A_t grad log mu(a_t|s_t) with GAE advantages normalised over the batch, the
    gradient of PPO's first minibatch step. Value and entropy terms are off, so only
    the policy leaves move; the critic's own leaves (a separate torso, the value head)
    get d = 0 exactly and stay mu's bit for bit. The same key gives the same d.

    The alternative, a real Adam epoch (several minibatch steps; Adam's per-coordinate
    scaling makes it closer to a sign step) is what a PPO learner's second epoch
    actually sees, but it depends on the optimiser's settings and state; this
    direction depends only on mu and the key.

    Raises:
      ValueError: if the gradient is zero or not finite (e.g. every advantage equal).
    """
    batch = _jit_sample(sample)(key, mu_params, config.direction_batch)
    hp = dict(gamma=config.gamma, lam=config.lam, clip_eps=config.clip_eps)
    estimators.get_estimator("ppo_clip", apply_fn=apply_fn, **hp)  # validates hp
    grad = _ppo_gradient(mu_params, batch, apply_fn, *hp.values())
    norm = float(_global_norm(grad))
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(
            f"the PPO direction at mu has norm {norm} on a batch of "
            f"{config.direction_batch} trajectories; use another key or a larger "
            "direction_batch"
        )
    return jax.tree.map(lambda g: -g / norm, grad)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _ppo_gradient(params, batch, apply_fn, gamma, lam, clip_eps) -> Params:
    """grad of ppo_clip (normalised advantages, no value or entropy terms)."""
    loss = functools.partial(
        estimators.ESTIMATORS["ppo_clip"],
        apply_fn=apply_fn,
        gamma=gamma,
        lam=lam,
        clip_eps=clip_eps,
        normalize_advantages=True,
        vf_coef=0.0,
        ent_coef=0.0,
    )
    return jax.grad(lambda p: loss(p, batch)[0])(params)


def step_params(mu_params: Params, direction: Params, alpha: float) -> Params:
    """theta = mu + alpha d, leaf by leaf (leaves with d = 0 stay mu's exactly)."""
    return jax.tree.map(
        lambda m, d: m + jnp.asarray(alpha, m.dtype) * d, mu_params, direction
    )


_step_params = jax.jit(step_params)  # the same compiled step for search and result


def _check_levels(kl_levels: Sequence[float]) -> tuple[float, ...]:
    levels = tuple(float(k) for k in kl_levels)
    if not levels:
        raise ValueError("kl_levels is empty; give at least one KL level, e.g. 0,0.01")
    bad = [k for k in levels if not (math.isfinite(k) and k >= 0)]
    if bad:
        raise ValueError(f"KL levels must be finite and >= 0, got {bad[0]}")
    if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"KL levels must be strictly increasing, got {list(levels)}")
    return levels


def _as_floats(s: Staleness) -> Staleness:
    return Staleness(*(float(x) for x in s))


def _bracket(kl_at: Callable, level: float, lo: float, config: LagConfig):
    """(lo, hi) with KL(lo) < level <= KL(hi), hi doubling up to max_step."""
    hi = min(max(config.initial_step, 2.0 * lo), config.max_step)
    while True:
        kl = kl_at(hi).kl
        if not math.isfinite(kl):
            raise ValueError(f"KL level {level}: KL(mu || pi) is {kl} at step {hi:.3g}")
        if kl >= level:
            return lo, hi
        if hi >= config.max_step:
            raise ValueError(
                f"KL level {level} is unreachable: KL(mu || pi) is only {kl:.3g} at "
                f"the largest step alpha = max_step = {config.max_step:g}; lower the "
                "level (--lag-kl), or from Python raise LagConfig.max_step"
            )
        lo, hi = hi, min(2.0 * hi, config.max_step)


def _find_step(kl_at: Callable, level: float, lo: float, config: LagConfig) -> float:
    """alpha with |KL(alpha) - level| <= rel_tol level, by bisection above ``lo``."""
    lo, hi = _bracket(kl_at, level, lo, config)
    for _ in range(config.max_bisections):
        mid = 0.5 * (lo + hi)
        kl = kl_at(mid).kl
        if abs(kl - level) <= config.rel_tol * level:
            return mid
        lo, hi = (mid, hi) if kl < level else (lo, mid)
    raise ValueError(
        f"KL level {level}: no step within rel_tol={config.rel_tol} after "
        f"{config.max_bisections} bisections (alpha in [{lo:.6g}, {hi:.6g}]); "
        "raise rel_tol"
    )


def targets_at_kl(
    key: jax.Array,
    mu_params: Params,
    apply_fn: ApplyFn,
    sample: Sampler,
    kl_levels: Sequence[float],
    config: LagConfig = LagConfig(),
    direction: Params | None = None,
) -> list[LagTarget]:
    """Target policies theta = mu + alpha d at each KL(mu || pi_theta) level.

    d is :func:`lag_direction` (from the first half of ``key``, unless given); KL is
    :func:`staleness`'s, on one fixed batch of ``config.eval_batch`` trajectories
    sampled from mu with the second half of ``key``, and alpha is found by doubling
    then bisection until |KL - level| <= rel_tol level. Level 0 returns ``mu_params``
    itself (bit for bit). The same key gives the same targets.

    Args:
      key: a PRNG key.
      mu_params: the behaviour policy's params.
      apply_fn: ``apply(params, obs) -> (logits, values)``.
      sample: ``sample(key, params, n) -> Trajectory [T, n]`` (the study's
        ``Problem.sample``).
      kl_levels: KL levels, >= 0 and strictly increasing (e.g. 0, 0.003, 0.01).
      config: a ``LagConfig``.
      direction: a unit direction (params pytree) to use instead of PPO's.

    Returns:
      One ``LagTarget`` per level, in order.

    Raises:
      ValueError: for an empty, negative, non-finite or non-increasing level list
        (before anything is sampled), or a level not reached within
        ``config.max_step``.
    """
    levels = _check_levels(kl_levels)
    key_direction, key_eval = jax.random.split(key)
    if direction is None:
        direction = lag_direction(key_direction, mu_params, apply_fn, sample, config)
    batch = _jit_sample(sample)(key_eval, mu_params, config.eval_batch)

    def target(alpha: float) -> Params:
        return _step_params(mu_params, direction, jnp.float32(alpha))

    def kl_at(alpha: float) -> Staleness:
        return _as_floats(staleness(mu_params, target(alpha), apply_fn, batch))

    targets, lo, lo_kl = [], 0.0, 0.0
    for level in levels:
        alpha = 0.0
        if level > 0:
            alpha = _find_step(kl_at, level, lo if lo_kl < level else 0.0, config)
        params = mu_params if level == 0 else target(alpha)
        s = _as_floats(staleness(mu_params, params, apply_fn, batch))
        targets.append(LagTarget(params, level, s.kl, s.max_ratio, alpha, s))
        lo, lo_kl = alpha, s.kl
    return targets


# ------------------------------------------------------ checkpoints of a run

_EVALUATION = re.compile(r"env_steps_(\d+)")


def run_evaluations(run_dir: str | Path) -> list[Path]:
    """The policies a run kept at every evaluation (``rl-pg train --keep-checkpoints
    all``: ``RUN_DIR/checkpoints/evaluations/env_steps_<N>``), ordered by N."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--run {run_dir}: no such directory")
    root = run_dir / "checkpoints" / files.EVALUATIONS_DIR
    found = [
        (int(m.group(1)), p)
        for p in (root.iterdir() if root.is_dir() else ())
        if p.is_dir() and (m := _EVALUATION.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def checkpoint_pairs(
    run_dir: str | Path, lag_checkpoints: int
) -> list[tuple[Path, Path]]:
    """(behaviour, target) = (checkpoint t, checkpoint t + K) for every t of a run.

    For ``rl-pg variance --run RUN_DIR --lag-checkpoints K``: the target is the policy
    training reached K evaluations after the behaviour, so the lag is real training
    lag. Every checkpoint's meta is read and must share the policy and env of the
    first (a KL between different networks or envs means nothing).

    Raises:
      ValueError: K not an int >= 1, a missing run, a run that kept fewer than K + 1
        evaluated policies, or checkpoints of different policies or envs.
    """
    if isinstance(lag_checkpoints, bool) or not isinstance(lag_checkpoints, int):
        raise ValueError(f"--lag-checkpoints must be an int, got {lag_checkpoints!r}")
    if lag_checkpoints < 1:
        raise ValueError(f"--lag-checkpoints must be >= 1, got {lag_checkpoints}")
    found = run_evaluations(run_dir)
    if len(found) <= lag_checkpoints:
        raise ValueError(
            f"{run_dir} kept {len(found)} evaluated policies; --lag-checkpoints "
            f"{lag_checkpoints} needs at least {lag_checkpoints + 1} (train with "
            "--keep-checkpoints all and more evaluations)"
        )
    same = ("policy", "env_id", "env_kwargs")
    first = checkpoint.read_meta(found[0])
    for path in found[1:]:
        meta = checkpoint.read_meta(path)
        if any(meta.get(k) != first.get(k) for k in same):
            raise ValueError(f"{path} has another policy or env than {found[0]}")
    k = lag_checkpoints
    return [(found[t], found[t + k]) for t in range(len(found) - k)]


_BEHAVIOUR_ONLY = ("held_out_", "validation_")  # measured on mu, not on the target


def save_target(
    directory: str | Path,
    params: Params,
    like_checkpoint: str | Path,
    *,
    kl: float,
    max_ratio: float,
    **extra: Any,
) -> Path:
    """Save a target policy as a checkpoint (``rl_pg.checkpoint`` format).

    meta.json is the behaviour checkpoint's (policy, env, ``reward_scale`` and the
    rest) without the scores measured on the behaviour (``held_out_*``,
    ``validation_*``), plus ``lag_kl``, ``max_ratio``, ``behaviour`` (the behaviour
    checkpoint's absolute path) and ``extra`` (e.g. ``lag_level``, ``lag_step``,
    ``lag_checkpoints``). ``rl-pg variance --checkpoints DIR`` loads it.

    Args:
      directory: the new checkpoint directory (replaced if it exists).
      params: the target's params (same tree as the behaviour's).
      like_checkpoint: the behaviour policy's checkpoint directory.
      kl: KL(mu || pi) of the target.
      max_ratio: its largest pi/mu.
      **extra: more JSON-serialisable metadata.

    Returns:
      ``directory``.
    """
    meta = checkpoint.read_meta(like_checkpoint)
    kept = {
        k: v
        for k, v in meta.items()
        if k not in ("policy", "env_id", "env_kwargs")
        and not k.startswith(_BEHAVIOUR_ONLY)
    }
    kept |= {
        "lag_kl": float(kl),
        "max_ratio": float(max_ratio),
        "behaviour": str(Path(like_checkpoint).resolve()),
        **extra,
    }
    return checkpoint.save_policy(
        directory,
        params,
        policy=meta["policy"],
        env_id=meta["env_id"],
        env_kwargs=meta.get("env_kwargs", {}),
        **kept,
    )


def target_name(level: float) -> str:
    """A checkpoint directory name for a KL level: ``kl_0.003``, ``kl_0``."""
    return f"kl_{level:g}"


# ------------------------------------------------- exact truth (enumerable MDP)


@functools.partial(jax.jit, static_argnums=2)
def _column_estimates(params: Params, batch: Trajectory, loss_fn: Callable):
    """[B, P] -grad loss(params, column b) for every column of ``batch``."""

    def one(column: Trajectory) -> jax.Array:
        column = jax.tree.map(lambda x: x[:, None], column)
        grad = jax.grad(lambda p: loss_fn(p, column)[0])(params)
        return -ravel_pytree(grad)[0]

    return jax.vmap(one, in_axes=1)(batch)


def off_policy_columns(
    mu_params: Params, pi_params: Params, loss_fn: Callable, mdp=enumerable.DEFAULT_MDP
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every trajectory of ``mdp`` as a one-column batch from mu, and its estimate.

    y(tau) = -grad_theta loss(pi_params, [tau]) at the target, the trajectory carrying
    mu's log-probs (``Trajectory.log_probs``) and values, so an importance-weighted
    loss sees rho = pi / mu.

    Args:
      mu_params, pi_params: tabular params (``enumerable.mdp_policy``).
      loss_fn: ``loss(params, batch) -> (loss, aux)`` with ``apply_fn`` bound, a
        per-trajectory estimator (its batch estimate is the mean of its columns').
      mdp: the MDP.

    Returns:
      ``(y [N, P] float64, p_mu(tau) [N] float64, s_0 [N])``, P the raveled params.
    """
    batch, probs, s0 = enumerable.enumerated_batch(mu_params, mdp)
    y = _column_estimates(pi_params, batch, loss_fn)
    return np.asarray(y, np.float64), np.asarray(probs, np.float64), np.asarray(s0)


def exact_off_policy(
    mu_params: Params, pi_params: Params, loss_fn: Callable, mdp=enumerable.DEFAULT_MDP
) -> tuple[np.ndarray, float]:
    """Exact mean [P] and trace variance of a one-column estimate on mu's data.

    mean = sum_tau p_mu(tau) y(tau), tr Var = sum_tau p_mu(tau) ||y(tau)||^2 -
    ||mean||^2, with y from :func:`off_policy_columns` (enumerating every trajectory).
    A batch of n i.i.d. columns has variance tr Var / n; for the study's grouped
    batches pass :func:`off_policy_columns`' output to
    ``rl_pg.variance.exact.grouped_batch_variance``. Compare ``mean`` with
    :func:`exact_gradient` at the target: equal for unbiased importance sampling.
    """
    y, probs, _ = off_policy_columns(mu_params, pi_params, loss_fn, mdp)
    mean = probs @ y
    second = probs @ np.sum(y * y, axis=1)
    return mean, float(max(second - mean @ mean, 0.0))


@functools.cache
def _reinforce(num_states: int, num_actions: int, value: bool) -> Callable:
    """One REINFORCE loss per table size (a stable static argument under jit)."""
    apply_fn = enumerable.tabular_policy(num_states, num_actions, value).apply
    return estimators.get_estimator("reinforce", apply_fn=apply_fn)


def exact_gradient(pi_params: Params, mdp=enumerable.DEFAULT_MDP) -> np.ndarray:
    """grad J at the target, raveled like :func:`off_policy_columns`' y: [P] float64.

    grad J = sum_tau p_pi(tau) R(tau) grad log p_pi(tau), each trajectory's term in
    float32 and the sum in float64 (as :func:`exact_off_policy` sums), so the two
    agree to ~1e-7; ``rl_pg.enumerable.exact_gradient`` (the same quantity summed in
    float32) is off by up to ~2e-6 on the default MDP.
    """
    loss = _reinforce(mdp.num_states, mdp.num_actions, "value" in pi_params)
    y, probs, _ = off_policy_columns(pi_params, pi_params, loss, mdp)
    return probs @ y
