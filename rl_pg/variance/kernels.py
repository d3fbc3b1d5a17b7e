"""The study's jitted kernels: per-trajectory gradients and batch estimates.

* :func:`weighted_column_grads`: sum_t w_t grad log pi(a_t|s_t) per column for
  several weightings at once (one forward pass and one VJP per column);
* the gradient phase's per-trajectory score and reward-to-go gradients
  (:func:`score_and_rtg`; a dense policy takes :mod:`rl_pg.variance.dense`);
* :func:`score_weight_estimates`: every weighted estimator on every sub-batch of
  a sampled batch from one VJP;
* :func:`in_blocks`: any of them in cache-sized blocks of trajectories.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rl_pg import estimators as estimators_lib
from rl_pg import policies
from rl_pg import returns as returns_lib
from rl_pg.trajectory import Trajectory
from rl_pg.variance import dense
from rl_pg.variance.problems import FromScores, Problem


def score_and_rtg(
    problem: Problem,
    block_steps: int | None = None,
    multiple: int = 1,
    gamma: float = 0.99,
    dense_block_steps: int | None = None,
):
    """Per-trajectory score s_i = grad log p(tau_i), reward-to-go gradient and R_i.

    Both gradients are sum_t w_t grad log pi(a_t|s_t), with w_t = m_t for the score
    and w_t = m_t G_t (G_t = sum_{t' >= t} r_t') for reward-to-go, so one forward
    pass and one VJP with the two weightings stacked as cotangents give both:
    every weight gradient is a single [in, T] x [T, 2 * out] product instead of
    two passes of [in, T] x [T, out]. A policy whose logits are a chain of dense
    layers takes :func:`rl_pg.variance.dense.dense_column_grads` instead (the
    backward pass once for both weightings, no transposes on the CPU). With
    ``block_steps`` (``dense_block_steps`` on the dense path, if given) the
    gradients run in cache-sized blocks of trajectories (:func:`in_blocks`). Returns ``(params, traj [T, C], out=None) -> (score [C, P],
    rtg [C, P], R [C], critic [6])``, ``critic`` the sums over live steps of 1, V,
    G, V^2, G^2 and V G, with V(s_t) the collection-time value and G the discounted
    (``gamma``) return-to-go, bootstrapped where the horizon cuts an episode (the
    critic's own target). ``out``, the (score, rtg) of an earlier call, is written
    over (the runner donates it): on the CPU, writing [C, P] outputs into fresh
    memory took as long as computing them (0.85 s against 0.45 s per full-preset
    chunk).
    """

    columns_grads = weighted_column_grads(problem.apply_fn, block_steps, multiple)

    def grads(params, traj: Trajectory, out=None):
        observations, actions, live = _clean(traj)
        rewards = jnp.where(live, traj.rewards.astype(jnp.float32), 0.0)
        done = traj.terminated | traj.truncated
        to_go = returns_lib.batch_reward_to_go(rewards, traj.mask, done)
        weights = jnp.stack([live, jnp.where(live, to_go, 0.0)], -1)  # [T, C, 2]
        columns = (observations, actions, weights.astype(jnp.float32))
        horizon, num = live.shape
        steps = block_steps if dense_block_steps is None else dense_block_steps
        size = None if steps is None else block_size(num, horizon, steps, multiple)
        found = dense.dense_column_grads(
            problem.apply_fn, params, columns, size, multiple, out
        )
        if found is None:  # not a chain of dense layers: vmap of a VJP per column
            g = columns_grads(params, columns)
            found = g[:, 0], g[:, 1]
            if out is not None:  # into the donated buffers
                found = tuple(
                    jax.lax.dynamic_update_slice(o, x, (0, 0))
                    for o, x in zip(out, found, strict=True)
                )
        score, rtg = found
        return score, rtg, jnp.sum(rewards, 0), _critic_sums(traj, gamma)

    return grads


def weighted_column_grads(
    apply_fn: Callable, block_steps: int | None = None, multiple: int = 1
) -> Callable:
    """``(params, (observations, actions, weights)) -> [C, F, P]``: per column c
    and weighting f, sum_t weights[t, c, f] grad log pi(a_t|s_t) as a flat vector.

    One forward pass and one VJP per column, with the F weightings stacked as
    cotangents (``vmap`` of the VJP), so every weight gradient is a single
    [in, T] x [T, F * out] product. Inputs are [T, C, ...], [T, C], [T, C, F];
    padding must already be zeroed (observations, actions and weights). With
    ``block_steps`` the columns run in cache-sized blocks (:func:`in_blocks`).
    """

    def one(params, observations, actions, weights):  # [T, ...], [T], [T, F]
        def log_probs(p):  # [T]
            logits, _ = apply_fn(p, observations)
            return policies.log_prob(logits, actions)

        _, vjp = jax.vjp(log_probs, params)
        return jax.vmap(lambda w: ravel_pytree(vjp(w)[0])[0], in_axes=1)(weights)

    def columns_grads(params, columns):  # leaves [T, C, ...] -> [C, F, P]
        return jax.vmap(one, in_axes=(None, 1, 1, 1))(params, *columns)

    if block_steps is not None:
        columns_grads = in_blocks(columns_grads, block_steps, multiple)
    return columns_grads


def _clean(traj: Trajectory) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(observations, actions, live) with padding observations and actions zeroed."""
    live = traj.mask > 0
    obs_live = live.reshape(live.shape + (1,) * (traj.observations.ndim - 2))
    observations = jnp.where(obs_live, traj.observations, 0)
    return observations, jnp.where(live, traj.actions, 0), live


def _policy_leaves(apply_fn: Callable, params: Any, observations: jax.Array):
    """Which leaves of ``params`` the logits depend on (a critic's do not), from
    the jaxpr's dead-code analysis; every leaf if that is unavailable."""
    leaves, treedef = jax.tree.flatten(params)

    def logits(leaves, obs):
        return apply_fn(jax.tree.unflatten(treedef, leaves), obs)[0]

    try:
        from jax._src.interpreters import partial_eval as pe  # no public API

        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        obs = jax.ShapeDtypeStruct(observations.shape, observations.dtype)
        closed = jax.make_jaxpr(logits)(shapes, obs)
        _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        return [bool(u) for u in used[: len(leaves)]]
    except Exception:  # pragma: no cover - a JAX without this internal
        return [True] * len(leaves)


def _split_params(params: Any, used: list[bool]):
    """(the used leaves, a function of them back to the whole params (the others
    without gradient), a function [..., P_used] -> [..., P] with zeros for the
    unused leaves in ``ravel_pytree`` order)."""
    leaves, treedef = jax.tree.flatten(params)
    kept = [x for x, u in zip(leaves, used, strict=True) if u]

    def merge(kept_leaves):
        it = iter(kept_leaves)
        full = [
            next(it) if u else jax.lax.stop_gradient(x)
            for x, u in zip(leaves, used, strict=True)
        ]
        return jax.tree.unflatten(treedef, full)

    def expand(flat):
        if all(used):
            return flat
        parts, start = [], 0
        for x, u in zip(leaves, used, strict=True):
            if u:
                parts.append(flat[..., start : start + x.size])
                start += x.size
            else:
                parts.append(jnp.zeros(flat.shape[:-1] + (x.size,), flat.dtype))
        return jnp.concatenate(parts, -1)

    return kept, merge, expand


def score_weight_estimates(
    problem: Problem,
    weight_fns: dict[str, Callable],
    sub_batches: dict[int, int],
    block_steps: int | None = None,
    multiple: int = 1,
    dense_block_steps: int | None = None,
) -> Callable:
    """``(params, batch [T, N]) -> {n: [count, E, P]}``: the batch estimates of
    every estimator in ``weight_fns`` (name -> ``weights(batch, inputs)``, see
    :class:`rl_pg.estimators.StepWeights`) on the first ``count`` disjoint
    sub-batches of n columns, for each ``n: count`` of ``sub_batches``.

    At the on-policy point each estimate is sum_f sum_i c_f[i] g_f[i] with
    g_f[i] = sum_t f[t, i] grad log pi(a_t|s_t) the gradient of feature f on
    column i. Features depend on their column alone, so one forward pass for the
    values, the per-column gradients of every distinct feature from one backward
    pass (:func:`feature_grads`), then, per sub-batch, the coefficients
    (elementwise work) and per feature one [E, n] x [n, P] product give all of
    them. Estimators given as :class:`FromScores` get the sub-batch's
    per-trajectory scores (the feature m_t's gradients) instead. Returned
    estimators are in the order of ``weight_fns``.
    """
    weighted = {e: fn for e, fn in weight_fns.items() if not isinstance(fn, FromScores)}
    names = tuple(weight_fns)

    def estimates(params, batch):
        observations, actions, live = _clean(batch)
        _, values = problem.apply_fn(params, observations)
        values = jax.lax.stop_gradient(values)
        keys, weights = _features(batch, weighted, live, values)  # [T, N, F]
        # only the policy's leaves: the critic's gradients are 0 (P' <= P)
        used = _policy_leaves(problem.apply_fn, params, observations[:, :1])
        kept, merge, expand = _split_params(params, used)
        basis = feature_grads(
            lambda p, obs: problem.apply_fn(merge(p), obs),
            kept,
            (observations, actions, weights),
            (block_steps, dense_block_steps),
            multiple,
        )  # F x [N, P']
        scores = basis[keys.index(estimators_lib.SCORE)]  # [N, P']
        sq_norms = jnp.sum(jnp.square(scores), -1)  # [N]
        coefficients = _coefficients_fn(weighted, keys)
        out = {}
        for n, count in sub_batches.items():
            sub = cut_sub_batches(batch, n, count)  # leaves [count, T, n]
            found = {}
            if weighted:
                sub_values = cut_sub_batches(values, n, count)
                sub_norms = sq_norms[: count * n].reshape(count, n)
                coefs = jax.vmap(coefficients)(sub, sub_values, sub_norms)
                est = sum(
                    jnp.einsum(
                        "cei,cip->cep",
                        coefs[..., f],
                        g[: count * n].reshape(count, n, -1),
                    )
                    for f, g in enumerate(basis)
                )  # [count, E_w, P']
                found = {e: est[:, i] for i, e in enumerate(weighted)}
            sub_scores = scores[: count * n].reshape(count, n, -1)
            for e, fn in weight_fns.items():
                if isinstance(fn, FromScores):
                    found[e] = jax.vmap(fn.fn)(sub, sub_scores)
            out[n] = expand(jnp.stack([found[e] for e in names], 1))
        return out

    return estimates


def feature_grads(apply_fn, params, columns, block_steps=(None, None), multiple=1):
    """F arrays [C, P]: per column c and feature f, sum_t weights[t, c, f] grad
    log pi(a_t|s_t) for ``columns`` = (observations, actions, weights [T, C, F]).

    A chain of dense layers takes :func:`rl_pg.variance.dense.dense_column_grads`
    (one backward pass for every feature), in blocks of ``block_steps[1]`` steps
    (``block_steps[0]`` if None); any other policy :func:`weighted_column_grads`
    in blocks of ``block_steps[0]`` (None: unblocked).
    """
    steps, dense_steps = block_steps
    dense_steps = steps if dense_steps is None else dense_steps
    horizon, num = columns[1].shape
    size = None
    if dense_steps is not None:
        size = block_size(num, horizon, dense_steps, multiple)
    found = dense.dense_column_grads(apply_fn, params, columns, size, multiple)
    if found is not None:
        return list(found)
    g = weighted_column_grads(apply_fn, steps, multiple)(params, columns)
    return [g[:, f] for f in range(g.shape[1])]


def _coefficients_fn(weighted: dict, keys: tuple) -> Callable:
    """``(sub, values, sq_norms) -> [E, n, F]``: one sub-batch's coefficients of
    each feature of ``keys`` for every estimator of ``weighted`` (0 where absent)."""

    def coefficients(sub, sub_values, sub_norms):
        sub_inputs = estimators_lib.WeightInputs(sub_values, sub_norms)
        rows = []
        for fn in weighted.values():
            c = fn(sub, sub_inputs).coefficients
            zero = jnp.zeros(sub_norms.shape)
            rows.append(jnp.stack([c.get(k, zero) for k in keys], -1))
        return jnp.stack(rows)

    return coefficients


def _features(batch, weighted: dict, live: jax.Array, values: jax.Array):
    """(feature keys, their per-step values [T, N, F]): the score's (the live mask,
    first) and every distinct feature of the ``weighted`` estimators."""
    inputs = estimators_lib.WeightInputs(values, jnp.zeros(live.shape[1]))
    features = {estimators_lib.SCORE: live.astype(jnp.float32)}
    for fn in weighted.values():
        for k, f in fn(batch, inputs).features.items():
            features.setdefault(k, f)
    keys = tuple(features)
    return keys, jnp.stack([features[k] for k in keys], -1)


def _critic_sums(traj: Trajectory, gamma: float) -> jax.Array:
    """Sums over live steps of 1, V, G, V^2, G^2, V G (see :func:`score_and_rtg`)."""
    live = traj.mask > 0
    values = jnp.where(live, traj.values, 0.0)
    targets = returns_lib.batch_discounted_returns(
        jnp.where(live, traj.rewards, 0.0),
        traj.terminated,
        traj.truncated,
        jnp.where(live, traj.next_values, 0.0),
        gamma,
    )
    targets = jnp.where(live, targets, 0.0)
    f = live.astype(jnp.float32)
    return jnp.stack(
        [
            jnp.sum(f),
            jnp.sum(values),
            jnp.sum(targets),
            jnp.sum(values**2),
            jnp.sum(targets**2),
            jnp.sum(values * targets),
        ]
    )


def block_size(num_trajectories: int, horizon: int, block_steps: int, multiple: int):
    """Trajectories per block: the largest divisor of ``num_trajectories`` that is a
    multiple of ``multiple`` (the device count) with at most ``block_steps`` steps
    (at least ``multiple`` trajectories)."""
    target = max(multiple, block_steps // max(horizon, 1))
    fits = [
        b
        for b in range(multiple, num_trajectories + 1, multiple)
        if num_trajectories % b == 0 and b <= target
    ]
    return max(fits) if fits else num_trajectories


def in_blocks(fn: Callable, block_steps: int, multiple: int = 1) -> Callable:
    """``fn(params, columns) -> leaves [C, ...]`` computed block by block.

    ``columns`` is a pytree of [T, C, ...] leaves. A ``lax.map`` over blocks of
    :func:`block_size` columns keeps each block's activations (``block x T x
    width`` floats per layer) in cache: the layers of a small policy network are
    memory-bound when a whole chunk's activations stream through memory. Column
    c = s * num_blocks + b is row s of block b, so a batch-sharded C (contiguous
    per device) stays sharded inside every block. Results are in column order.
    """

    def blocked(params, columns):
        horizon, num = jax.tree.leaves(columns)[0].shape[:2]
        size = block_size(num, horizon, block_steps, multiple)
        blocks = num // size

        def split(x):  # [T, C, ...] -> [blocks, T, size, ...]
            return jnp.moveaxis(x.reshape(horizon, size, blocks, *x.shape[2:]), 2, 0)

        out = jax.lax.map(lambda c: fn(params, c), jax.tree.map(split, columns))
        return jax.tree.map(
            lambda x: jnp.swapaxes(x, 0, 1).reshape(num, *x.shape[2:]), out
        )

    return blocked


def cut_sub_batches(batch: Trajectory, n: int, count: int) -> Trajectory:
    """The first ``count`` disjoint column blocks of size n: leaves [count, T, n]."""

    def cut(x):
        x = x[:, : count * n].reshape(x.shape[0], count, n, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(cut, batch)
