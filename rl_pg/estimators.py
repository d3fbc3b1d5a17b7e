"""Policy-gradient estimators as surrogate losses.

Every estimator is a pure function

    loss, aux = estimator(params, batch, *, apply_fn, **hyperparameters)

whose ``jax.grad`` with respect to ``params`` is an estimate of -grad J, so minimising
the loss ascends J(theta) = E_tau[sum_t r_t]. Log-probabilities are recomputed from
``params`` through ``apply_fn(params, batch.observations) -> (logits [T, B, A], values
[T, B])``; advantages and baselines are under ``stop_gradient``. Hyperparameters are
keyword-only, to be bound with ``functools.partial`` (or ``get_estimator``).

Aggregation. Unless stated otherwise a per-step quantity x_{t,i} enters the loss as

    (1/B) sum_i sum_t m_{t,i} x_{t,i},

a sum over the steps of a trajectory and a mean over the B columns, so that in an
episodic batch the gradient estimates grad J itself (the seed's
Loss = -(1/n) sum_i sum_t log pi(a_t|s_t) R(tau_i)). Value and entropy terms use the
same aggregation, so the relative weights ``vf_coef`` and ``ent_coef`` mean what they
mean in PPO implementations that average over steps; the overall scale is larger by the
number of steps per column. GRPO and Dr. GRPO aggregate every per-token term (policy,
KL and entropy) their own way (per-sequence means; a constant 1/(B T)), as in
DeepSeekMath and Liu et al. 2025, so their ``ent_coef`` weighs the mean token entropy
as PPO's does after training divides its loss by the steps per column.

Batch layout. Estimators marked *trajectory-level* (constant, mean, leave-one-out,
optimal baselines, GRPO, Dr. GRPO) use R(tau_i) = sum_t m_{t,i} r_{t,i} of column i and
expect episodic batches (one episode per column). Groups (RLOO, mean baseline, optimal
baseline, GRPO) are contiguous blocks of ``group_size`` columns: column b belongs to
group b // group_size (the "levels x G" layout of grouped rollouts; ``batch.level`` is
not read); ``group_size=None`` makes the whole batch one group.

Padding. Steps with mask 0 change nothing: their observations and actions are replaced
by zeros before ``apply_fn`` and every weight is selected to 0 there, so arbitrary (even
non-finite) padding leaves loss and gradient unchanged.
"""

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rl_pg import policies
from rl_pg import returns as returns_lib
from rl_pg.trajectory import Trajectory

Params = Any
ApplyFn = Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]
sg = jax.lax.stop_gradient


class LossAux(NamedTuple):
    """Diagnostics of one loss evaluation; all scalars (0 where not applicable).

    Attributes:
      pg_loss: the policy-gradient part of the loss.
      value_loss: 0.5 (V(s_t) - target_t)^2, aggregated like the loss (before vf_coef).
      entropy: mean policy entropy over live steps.
      kl: mean KL estimate to the reference policy over live steps (GRPO family).
      approx_kl: mean KL(pi_behaviour || pi) estimate (r - 1) - log r over live steps,
        r = pi / pi_behaviour (ratio-based estimators).
      clip_fraction: fraction of live steps whose ratio lies outside [1 - eps, 1 + eps].
    """

    pg_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array
    kl: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array


def as_loss_aux(aux: Any, loss: jax.Array, name: str = "loss") -> LossAux:
    """A loss's ``aux`` as training logs it: a :class:`LossAux` as it is; a mapping
    of some of its fields (a user's loss may return ``{}``) or None with the
    others 0 and ``pg_loss`` the loss itself.

    Raises:
      ValueError: for keys that are not :class:`LossAux` fields, or another type.
    """
    if isinstance(aux, LossAux):
        return aux
    fields = {} if aux is None else aux
    if not isinstance(fields, dict) or set(fields) - set(LossAux._fields):
        raise ValueError(
            f"estimator {name!r} returned aux {aux!r}: training takes a LossAux, "
            f"or a dict of some of its fields ({', '.join(LossAux._fields)}), or {{}}"
        )
    zero = jnp.zeros((), jnp.float32)
    default = {"pg_loss": loss}
    return LossAux(**{f: fields.get(f, default.get(f, zero)) for f in LossAux._fields})


class _Forward(NamedTuple):
    logits: jax.Array  # [T, B, A]
    values: jax.Array  # [T, B] V(s_t) under params (with gradient)
    log_probs: jax.Array  # [T, B] log pi(a_t|s_t) under params
    mask: jax.Array  # [T, B] float32


# ----------------------------------------------------------------------------- helpers


def _keyword_only(fn: Callable) -> dict[str, Any]:
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }


def _live(mask: jax.Array) -> jax.Array:
    return mask > 0


def _zero_padding(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x where live, 0 on padding (a select, so non-finite padding does not leak)."""
    return jnp.where(_live(mask), x, jnp.zeros_like(x))


def _per_trajectory(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(1/B) sum_i sum_t m_{t,i} x_{t,i} for x [T, B]."""
    return jnp.sum(_zero_padding(x, mask)) / mask.shape[1]


def _per_live_step(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over live steps (0 if there are none)."""
    return jnp.sum(_zero_padding(x, mask)) / jnp.maximum(jnp.sum(mask), 1.0)


def _clean_inputs(batch: Trajectory) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(observations, actions, mask) with padding observations and actions zeroed."""
    per_step = [
        batch.actions, batch.rewards, batch.mask, batch.log_probs, batch.values,
        batch.next_values, batch.terminated, batch.truncated,
    ]  # fmt: skip
    chex.assert_rank(per_step, 2)
    chex.assert_equal_shape(per_step)  # e.g. no [T, 1] log_probs broadcast over B
    if 0 in batch.mask.shape:
        shape = batch.mask.shape
        raise ValueError(
            f"an estimator needs a batch [T, B] with T, B >= 1, got {shape}"
        )
    mask = batch.mask.astype(jnp.float32)
    live = _live(mask)
    obs_live = live.reshape(live.shape + (1,) * (batch.observations.ndim - 2))
    observations = jnp.where(
        obs_live, batch.observations, jnp.zeros_like(batch.observations)
    )
    return observations, jnp.where(live, batch.actions, 0), mask


def _forward(params: Params, batch: Trajectory, apply_fn: ApplyFn) -> _Forward:
    observations, actions, mask = _clean_inputs(batch)
    logits, values = apply_fn(params, observations)
    return _Forward(logits, values, policies.log_prob(logits, actions), mask)


def _score_surrogate(log_probs: jax.Array, weights: jax.Array, mask: jax.Array):
    """-(1/B) sum_i sum_t m log pi(a_t|s_t) w_t; gradient -(1/B) sum m w grad log pi."""
    weights = _zero_padding(sg(weights), mask)
    return -_per_trajectory(log_probs * weights, mask)


def _done(batch: Trajectory) -> jax.Array:
    return jnp.logical_or(batch.terminated, batch.truncated)


def _episode_returns(batch: Trajectory) -> jax.Array:
    """[B] R(tau_i) = sum_t m_{t,i} r_{t,i}."""
    return jnp.sum(_zero_padding(batch.rewards.astype(jnp.float32), batch.mask), 0)


def _num_groups(num_columns: int, group_size: int | None) -> int:
    size = num_columns if group_size is None else group_size
    if size < 1 or num_columns % size:
        raise ValueError(
            f"group_size={group_size} must divide the number of columns B="
            f"{num_columns}; columns are laid out as (B // group_size) groups of "
            "group_size consecutive columns."
        )
    return num_columns // size


def _grouped(x: jax.Array, group_size: int | None) -> jax.Array:
    """[B, ...] -> [B // G, G, ...] (column b in group b // G)."""
    k = _num_groups(x.shape[0], group_size)
    return x.reshape((k, x.shape[0] // k, *x.shape[1:]))


def _group_mean(x: jax.Array, group_size: int | None) -> jax.Array:
    """[B, ...] -> [B, ...] mean over each column's group, the column included."""
    xg = _grouped(x, group_size)
    mean = jnp.broadcast_to(jnp.mean(xg, axis=1, keepdims=True), xg.shape)
    return mean.reshape(x.shape)


def _grouped_last(x: jax.Array, group_size: int | None) -> jax.Array:
    """[..., B] -> [..., B // G, G] (entry b in group b // G)."""
    k = _num_groups(x.shape[-1], group_size)
    return x.reshape((*x.shape[:-1], k, x.shape[-1] // k))


def _group_sum_others(x: jax.Array, group_size: int | None) -> jax.Array:
    """[..., B] -> [..., B] sum over the other members of each entry's group (groups
    of consecutive entries along the last axis).

    total - x_i, except for a member that dominates its group (|x_i| more than
    half the group's sum of |x|; at most one per group and component), which gets
    the sum of the others taken directly: total - x_i cancels only for such a
    member, so every result's error is a few ulps of sum_{j != i} |x_j|, as for a
    direct sum. Groups run along the last (contiguous) axis: per-parameter callers
    pass [P, B], since sums over the leading axis of [B, P] vectorise poorly on
    CPU.
    """
    xg = _grouped_last(x, group_size)
    dominant = 2 * jnp.abs(xg) > _sum_last(jnp.abs(xg))
    rest = _sum_last(jnp.where(dominant, 0.0, xg))
    return jnp.where(dominant, rest, _sum_last(xg) - xg).reshape(x.shape)


def _sum_last(v: jax.Array) -> jax.Array:
    """[..., G] -> [..., 1] sums, as a product with ones: on XLA:CPU a sum over the
    last axis of [P, B] fused with its broadcast back (as here) ran 3-10x slower
    than the product (the per-parameter optimal baseline at the study's sizes)."""
    ones = jnp.ones((v.shape[-1], 1), v.dtype)
    return jnp.matmul(v, ones, precision=jax.lax.Precision.HIGHEST)  # no TF32/bf16


def _group_sum(x: jax.Array, group_size: int | None) -> jax.Array:
    """[..., B] -> [..., B] sum over each entry's group (along the last axis), the
    entry included."""
    xg = _grouped_last(x, group_size)
    total = jnp.broadcast_to(_sum_last(xg), xg.shape)
    return total.reshape(x.shape)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den > 0, else 0."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def _make_aux(
    fwd: _Forward,
    pg_loss: jax.Array,
    *,
    value_loss: jax.Array | float = 0.0,
    kl: jax.Array | float = 0.0,
    approx_kl: jax.Array | float = 0.0,
    clip_fraction: jax.Array | float = 0.0,
) -> LossAux:
    entropy = _per_live_step(policies.entropy(fwd.logits), fwd.mask)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return LossAux(
        pg_loss=f32(pg_loss),
        value_loss=f32(value_loss),
        entropy=f32(sg(entropy)),
        kl=f32(sg(kl)),
        approx_kl=f32(sg(approx_kl)),
        clip_fraction=f32(sg(clip_fraction)),
    )


def _normalize(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / (std + eps) over live steps."""
    mean = _per_live_step(x, mask)
    var = _per_live_step(jnp.square(x - mean), mask)
    return (x - mean) / (jnp.sqrt(var) + eps)


def _reference_kl(
    fwd: _Forward,
    batch: Trajectory,
    apply_fn: ApplyFn,
    ref_params: Params | None,
    beta: float,
) -> jax.Array:
    """[T, B] k3 estimator of KL(pi || pi_ref) per step (Schulman 2020), 0 if beta = 0.

    KL_t = pi_ref/pi - log(pi_ref/pi) - 1 at the taken action (Shao et al. 2024).
    """
    if isinstance(beta, int | float) and beta == 0:
        return jnp.zeros_like(fwd.log_probs)
    if ref_params is None:
        raise ValueError("beta > 0 needs ref_params (the reference policy's params).")
    ref_fwd = _forward(sg(ref_params), batch, apply_fn)
    log_ratio = _zero_padding(ref_fwd.log_probs - fwd.log_probs, fwd.mask)
    return jnp.exp(log_ratio) - log_ratio - 1.0


# ------------------------------------------------------------ per-step weights
#
# The gradient of every estimator below (but the per-parameter optimal baseline),
# with its value, entropy and KL terms off, is a weighting of per-step scores:
#
#   -grad loss = sum_{t,i} w_{t,i} grad log pi(a_t|s_t).
#
# At the on-policy point (the batch was just sampled with ``params``) the weights
# come as a few named per-step *features* f[t, i], each a function of column i
# alone (mask, returns, advantages), with per-column *coefficients* c[i] that may
# depend on the whole batch (baselines, normalisation, 1/B): w_{t,i} = sum_f
# c_f[i] f[t, i]. That split lets the variance study compute each feature's
# per-trajectory gradient once per sampled batch and get every estimator on every
# sub-batch from coefficients (rl_pg.variance.study). Each estimator declares its
# weights once (a *declaration*, ``Surrogate``); ``surrogate_loss`` builds its loss
# from them and from optional terms (``value_regression``, ``entropy_bonus``,
# ``reference_kl``), and ``policy_weights`` gives the weights alone.

SCORE = "score"  # the feature m_t: its per-trajectory gradient is grad log p(tau_i)


class StepWeights(NamedTuple):
    """-grad loss = sum_f sum_{t,i} coefficients[f][i] features[f][t, i] grad log pi.

    Attributes:
      features: name -> [T, B] per-step weights of column i (0 on padding); equal
        names mean equal arrays (so callers may share them between estimators).
        On-policy (``WeightInputs.log_probs`` None) each depends on column i alone;
        with ratios, a clipped estimator's features may depend on the batch (which
        steps are clipped depends on the sign of a batch-normalised advantage), so
        compute them on the batch the estimate is for.
      coefficients: name -> [B] per-column coefficients (may depend on the batch);
        the same names as ``features``.
    """

    features: dict[str, jax.Array]
    coefficients: dict[str, jax.Array]

    def dense(self) -> jax.Array:
        """[T, B] w_{t,i} = sum_f c_f[i] f[t, i]."""
        return sum(self.coefficients[k][None, :] * f for k, f in self.features.items())


class WeightInputs(NamedTuple):
    """What per-step weights may read besides the batch (all without gradient).

    Attributes:
      values: [T, B] V(s_t) under the params (``apply_fn``'s second output).
      score_sq_norms: [B] ||s_i||^2 of the per-trajectory scores
        s_i = sum_t m_t grad log pi(a_t|s_t) (the optimal baseline's weights).
      log_probs: [T, B] log pi_theta(a_t|s_t) of the taken actions under the
        params (the target policy), or None for the on-policy point: then every
        ratio pi_theta / mu is taken as exactly 1 (the weights are the on-policy
        ones, bit for bit). The behaviour's log mu(a_t|s_t) is ``batch.log_probs``.
    """

    values: jax.Array
    score_sq_norms: jax.Array
    log_probs: jax.Array | None = None


class Surrogate(NamedTuple):
    """What an estimator declares for one batch (everything without gradient).

    Attributes:
      weights: the policy term's -gradient as per-step score weights.
      objective: [] the policy term's value where it is not the plain surrogate
        -sum_{t,i} w_{t,i} log pi(a_t|s_t) (a clipped or importance-weighted
        objective); None for the plain surrogate.
      value_targets: [T, B] the critic's regression targets (for
        ``value_regression``), or None.
      approx_kl: [] mean (r - 1) - log r over live steps, r = pi / mu (0 on-policy).
      clip_fraction: [] fraction of live steps whose ratio was clipped or truncated.
    """

    weights: StepWeights
    objective: jax.Array | None = None
    value_targets: jax.Array | None = None
    approx_kl: jax.Array | float = 0.0
    clip_fraction: jax.Array | float = 0.0


def trajectory_scores(
    params: Params, batch: Trajectory, apply_fn: ApplyFn
) -> jax.Array:
    """[B, P] per-column scores s_i = sum_t m_t grad log pi(a_t|s_t), flattened
    (``ravel_pytree`` order), at ``stop_gradient(params)``."""
    observations, actions, mask = _clean_inputs(batch)

    def trajectory_log_prob(p, obs, act, m):
        logits, _ = apply_fn(p, obs)
        return jnp.sum(_zero_padding(policies.log_prob(logits, act), m))

    def flat_score(obs, act, m):
        grads = jax.grad(trajectory_log_prob)(sg(params), obs, act, m)
        return ravel_pytree(grads)[0]

    return jax.vmap(flat_score, in_axes=(1, 1, 1))(observations, actions, mask)


def weight_inputs(
    params: Params, batch: Trajectory, apply_fn: ApplyFn, *, ratios: bool = False
) -> WeightInputs:
    """``WeightInputs`` computed directly (a forward pass and per-column gradients);
    with ``ratios`` the target log-probs too (weights at ``params`` as the target
    of ``batch``'s behaviour policy)."""
    observations, actions, _ = _clean_inputs(batch)
    logits, values = apply_fn(params, observations)
    scores = trajectory_scores(params, batch, apply_fn)
    log_probs = sg(policies.log_prob(logits, actions)) if ratios else None
    return WeightInputs(sg(values), sg(jnp.sum(jnp.square(scores), axis=1)), log_probs)


def weighted_gradient(
    params: Params, batch: Trajectory, weights: StepWeights, apply_fn: ApplyFn
) -> Params:
    """-grad loss from per-step weights: grad of sum_{t,i} w_{t,i} log pi(a_t|s_t)."""

    def surrogate(p):
        fwd = _forward(p, batch, apply_fn)
        return jnp.sum(_zero_padding(fwd.log_probs * sg(weights.dense()), fwd.mask))

    return jax.grad(surrogate)(params)


# ------------------------------------------------------- building losses from weights


class Term(NamedTuple):
    """An optional piece of a surrogate loss besides the policy term.

    Attributes:
      hyperparameters: name -> default, added to the loss's keyword arguments.
      loss: ``loss(fwd, batch, apply_fn, surrogate, hp) -> (value, aux fields)``,
        hp the loss's bound hyperparameters; value is added to the loss.
      switches: hyperparameters that must be 0 for the policy weights alone to be
        the loss's gradient (``policy_weights`` refuses others).
      policy: the value counts in ``LossAux.pg_loss`` (a KL penalty on the policy).
    """

    hyperparameters: dict[str, Any]
    loss: Callable[..., tuple[jax.Array, dict]]
    switches: tuple[str, ...]
    policy: bool = False


def _per_sequence_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(1/B) sum_i (1/|o_i|) sum_t m x (GRPO's aggregation; |o_i| at least 1)."""
    lengths = jnp.maximum(jnp.sum(mask, axis=0), 1.0)
    return jnp.mean(jnp.sum(_zero_padding(x, mask), axis=0) / lengths)


def _per_token_budget(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(1/(B T)) sum_i sum_t m x (Dr. GRPO's constant normaliser)."""
    per_sequence = jnp.sum(_zero_padding(x, mask), axis=0)
    return jnp.sum(per_sequence) / (mask.shape[1] * mask.shape[0])


def value_regression(vf_coef: float = 0.5, *, clipped: bool = False) -> Term:
    """vf_coef (1/B) sum_i sum_t m 0.5 (V(s_t) - target_t)^2, V recomputed from the
    params, targets the declaration's ``value_targets``. ``clipped`` adds PPO's
    ``clip_value_loss``: max((V - target)^2, (V_clip - target)^2) per step with
    V_clip = V_old + clip(V - V_old, -clip_eps, clip_eps), V_old the batch's
    collection-time values (PureJaxRL, CleanRL)."""

    def loss(fwd, batch, apply_fn, surrogate, hp):
        values, targets = fwd.values, sg(surrogate.value_targets)
        if hp.get("clip_value_loss", False):
            old = sg(batch.values)
            clipped_values = old + jnp.clip(
                values - old, -hp["clip_eps"], hp["clip_eps"]
            )
            larger = jnp.abs(clipped_values - targets) > jnp.abs(values - targets)
            values = jnp.where(larger, clipped_values, values)
        targets = _zero_padding(targets, fwd.mask)
        value_loss = _per_trajectory(0.5 * jnp.square(values - targets), fwd.mask)
        return hp["vf_coef"] * value_loss, {"value_loss": value_loss}

    defaults = {"vf_coef": vf_coef} | ({"clip_value_loss": False} if clipped else {})
    return Term(defaults, loss, ("vf_coef",))


def entropy_bonus(ent_coef: float = 0.0, aggregate: Callable = _per_trajectory):
    """-ent_coef aggregate(H(pi(.|s_t))), aggregated like the policy term."""

    def loss(fwd, batch, apply_fn, surrogate, hp):
        entropy = aggregate(policies.entropy(fwd.logits), fwd.mask)
        return -hp["ent_coef"] * entropy, {}

    return Term({"ent_coef": ent_coef}, loss, ("ent_coef",))


def reference_kl(aggregate: Callable) -> Term:
    """beta aggregate(KL_t), the k3 estimator KL_t = pi_ref/pi - log(pi_ref/pi) - 1 to
    a reference policy ``ref_params`` (Shao et al. 2024; Schulman 2020)."""

    def loss(fwd, batch, apply_fn, surrogate, hp):
        kl = _reference_kl(fwd, batch, apply_fn, hp["ref_params"], hp["beta"])
        return hp["beta"] * aggregate(kl, fwd.mask), {
            "kl": _per_live_step(kl, fwd.mask)
        }

    return Term({"beta": 0.0, "ref_params": None}, loss, ("beta",), policy=True)


_TERM_DOCS = {
    "vf_coef": "weight of the value loss.",
    "clip_value_loss": "clip the value loss as PPO implementations do.",
    "ent_coef": "weight of the entropy bonus (aggregated like the policy term).",
    "beta": "weight of the KL penalty to the reference policy.",
    "ref_params": "params of the reference policy (same ``apply_fn``).",
}


class Weighting(NamedTuple):
    """How a loss was built: its declaration, terms and inputs."""

    declare: Callable[..., Surrogate]
    terms: tuple[Term, ...]
    score_norms: bool


def _signature(leading: tuple[str, ...], keywords: dict[str, Any]):
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature(
        [inspect.Parameter(name, positional) for name in leading]
        + [
            inspect.Parameter(k, keyword, default=v)
            if v is not inspect.Parameter.empty
            else inspect.Parameter(k, keyword)
            for k, v in keywords.items()
        ]
    )


def _bind(signature: inspect.Signature, *args: Any, **kwargs: Any) -> dict:
    """Hyperparameters with defaults applied (TypeError for unknown ones)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return {
        p.name: bound.arguments[p.name]
        for p in signature.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name != "apply_fn"
    }


def _hyperparameters_of(declare: Callable, terms: tuple[Term, ...]) -> dict:
    own = _keyword_only(declare)
    for term in terms:
        clash = set(own) & set(term.hyperparameters)
        if clash:
            raise ValueError(f"{declare.__name__}: hyperparameters {clash} twice")
        own = own | term.hyperparameters
    return own


def _split_doc(declare: Callable) -> tuple[str, str]:
    """(body, Args lines) of a declaration's docstring."""
    doc = inspect.cleandoc(declare.__doc__ or "")
    body, _, args = doc.partition("\nArgs:\n")
    return body.rstrip(), args.rstrip()


def _policy_loss(fwd: _Forward, surrogate: Surrogate) -> jax.Array:
    """The policy term: value -sum w log pi (or the declared objective), gradient
    -sum_{t,i} w_{t,i} grad log pi(a_t|s_t)."""
    weights = _zero_padding(sg(surrogate.weights.dense()), fwd.mask)
    plain = -jnp.sum(_zero_padding(fwd.log_probs * weights, fwd.mask))
    if surrogate.objective is None:
        return plain
    return sg(surrogate.objective) + (plain - sg(plain))


def surrogate_loss(
    declare: Callable[..., Surrogate], *terms: Term, score_norms: bool = False
) -> Callable[..., tuple[jax.Array, LossAux]]:
    """The loss ``loss(params, batch, *, apply_fn, **hyperparameters)`` of an
    estimator declared by ``declare(batch, inputs, **own) -> Surrogate``.

    loss = policy term + sum of ``terms``; the policy term's gradient is
    -sum_{t,i} w_{t,i} grad log pi(a_t|s_t) with the declared weights at
    inputs = (V, ||s_i||^2 if ``score_norms``, log pi) under the params, all
    without gradient (so ratios rho_t = pi / mu enter the weights as numbers);
    its value is the declared objective, or the plain surrogate -sum w log pi.
    The hyperparameters are the declaration's keyword-only ones, then the terms'.
    """
    name = declare.__name__.lstrip("_")
    keywords = _hyperparameters_of(declare, terms)
    own = tuple(_keyword_only(declare))
    signature = _signature(
        ("params", "batch"), {"apply_fn": inspect.Parameter.empty, **keywords}
    )

    def loss(params, batch, *, apply_fn, **kwargs):
        hp = _bind(signature, params, batch, apply_fn=apply_fn, **kwargs)
        fwd = _forward(params, batch, apply_fn)
        norms = jnp.zeros(fwd.mask.shape[1:])
        if score_norms:
            scores = trajectory_scores(params, batch, apply_fn)
            norms = jnp.sum(jnp.square(scores), axis=1)
        inputs = WeightInputs(sg(fwd.values), sg(norms), sg(fwd.log_probs))
        surrogate = declare(batch, inputs, **{k: hp[k] for k in own})
        pg_loss = _policy_loss(fwd, surrogate)
        total, fields = pg_loss, {}
        for term in terms:
            value, aux = term.loss(fwd, batch, apply_fn, surrogate, hp)
            total, fields = total + value, fields | aux
            pg_loss = pg_loss + value if term.policy else pg_loss
        aux = _make_aux(
            fwd,
            pg_loss,
            approx_kl=surrogate.approx_kl,
            clip_fraction=surrogate.clip_fraction,
            **fields,
        )
        return total, aux

    body, args = _split_doc(declare)
    term_args = [f"  {k}: {_TERM_DOCS[k]}" for t in terms for k in t.hyperparameters]
    _finish(loss, name, signature, _loss_doc(body, args.splitlines() + term_args))
    loss.weighting = Weighting(declare, terms, score_norms)
    return loss


def policy_weights(loss: Callable) -> Callable[..., StepWeights]:
    """``weights(batch, inputs, **hyperparameters) -> StepWeights`` of a loss built
    by ``surrogate_loss``: its policy term's declared weights, taking the loss's
    hyperparameters; ValueError if a term that changes the gradient is on (value,
    entropy or KL coefficients must be 0)."""
    declare, terms, _ = loss.weighting
    name = loss.__name__
    keywords = _hyperparameters_of(declare, terms)
    own = tuple(_keyword_only(declare))
    signature = _signature(("batch", "inputs"), keywords)

    def weights(batch, inputs, **kwargs):
        hp = _bind(signature, batch, inputs, **kwargs)
        on = [
            k
            for term in terms
            for k in term.switches
            if not (isinstance(hp[k], jax.Array) or hp[k] == 0)
        ]
        if on:
            raise ValueError(
                f"{name}: per-step weights describe the policy-gradient terms only; "
                f"{', '.join(f'{k}={hp[k]!r}' for k in on)} must be 0."
            )
        return declare(batch, inputs, **{k: hp[k] for k in own}).weights

    weights.__doc__ = f"``{name}``'s per-step score weights (see ``policy_weights``)."
    weights.__name__ = weights.__qualname__ = f"{name}_weights"
    weights.__module__ = __name__
    weights.__signature__ = signature
    return weights


def _finish(loss: Callable, name: str, signature, doc: str) -> None:
    loss.__doc__ = doc
    loss.__name__ = loss.__qualname__ = name
    loss.__module__ = __name__
    loss.__signature__ = signature


def scores_loss(
    from_scores: Callable[..., jax.Array], name: str, value: Callable[..., Surrogate]
) -> Callable:
    """The loss of an estimator that is no weighting of scores but a function
    ``from_scores(batch, scores [B, P], **hyperparameters) -> g [P]`` of the
    per-trajectory scores (at ``stop_gradient(params)``): gradient exactly -g (g
    without gradient), value that of the declaration ``value``'s policy term (a
    surrogate with the same expected gradient, e.g. REINFORCE's)."""
    keywords = _keyword_only(from_scores)
    signature = _signature(
        ("params", "batch"), {"apply_fn": inspect.Parameter.empty, **keywords}
    )

    def loss(params, batch, *, apply_fn, **kwargs):
        hp = _bind(signature, params, batch, apply_fn=apply_fn, **kwargs)
        fwd = _forward(params, batch, apply_fn)
        scores = trajectory_scores(params, batch, apply_fn)
        estimate = from_scores(batch, scores, **hp)
        linear = -jnp.sum(sg(estimate) * ravel_pytree(params)[0])
        shown = _policy_loss(fwd, value(batch, WeightInputs(sg(fwd.values), None)))
        pg_loss = sg(shown) + (linear - sg(linear))
        return pg_loss, _make_aux(fwd, pg_loss)

    body, args = _split_doc(from_scores)
    _finish(loss, name, signature, _loss_doc(body, args.splitlines()))
    return loss


def _loss_doc(body: str, args: list[str]) -> str:
    head = [
        "  params: policy params.",
        "  batch: [T, B] trajectories.",
        "  apply_fn: ``apply(params, obs) -> (logits, values)``.",
    ]
    tail = ["", "Returns:", "  (loss, LossAux)."]
    return "\n".join([body, "", "Args:", *head, *args, *tail])


# ------------------------------------------------------------ weight building blocks


def _feature_key(name: str, *values: Any) -> str:
    """A feature's name with its hyperparameters (Python numbers by value, arrays
    by identity, so equal names mean equal features)."""
    parts = [repr(v) if _is_number(v) else f"array@{id(v)}" for v in values]
    return f"{name}({', '.join(parts)})" if parts else name


def _score_feature(batch: Trajectory) -> jax.Array:
    return (batch.mask > 0).astype(jnp.float32)


def _column_weights(
    batch: Trajectory, name: str, feature: jax.Array, per_column: jax.Array
) -> StepWeights:
    """One feature (0 on padding) with per-column coefficients [B] (or a scalar)."""
    coefficient = jnp.broadcast_to(per_column, batch.mask.shape[1:])
    feature = _zero_padding(feature.astype(jnp.float32), batch.mask)
    return StepWeights({name: feature}, {name: coefficient.astype(jnp.float32)})


def _merge(*parts: StepWeights) -> StepWeights:
    features, coefficients = {}, {}
    for part in parts:
        features |= part.features
        coefficients |= part.coefficients
    return StepWeights(features, coefficients)


def _return_feature(batch: Trajectory) -> jax.Array:
    mask = batch.mask.astype(jnp.float32)
    return returns_lib.batch_total_return(batch.rewards, mask, _done(batch))


def _reward_to_go_feature(batch: Trajectory) -> jax.Array:
    mask = batch.mask.astype(jnp.float32)
    return returns_lib.batch_reward_to_go(batch.rewards, mask, _done(batch))


def _score_weights(batch: Trajectory, advantages: jax.Array) -> StepWeights:
    """w_t = A_i / B for one advantage per trajectory, A [B]."""
    return _column_weights(
        batch, SCORE, _score_feature(batch), advantages / batch.mask.shape[1]
    )


def _gae_feature(batch: Trajectory, gamma, lam, advantages) -> tuple[str, jax.Array]:
    if advantages is not None:
        return _feature_key("advantages", advantages), sg(advantages)
    return _feature_key("gae", gamma, lam), returns_lib.trajectory_gae(
        batch, gamma, lam
    )


def _log_ratio(batch: Trajectory, inputs: WeightInputs) -> jax.Array | None:
    """[T, B] log rho_t = log pi_theta - log mu (0 on padding); None on-policy."""
    if inputs.log_probs is None:
        return None
    behaviour = _zero_padding(batch.log_probs, batch.mask)
    return _zero_padding(inputs.log_probs - behaviour, batch.mask)


def _scaled(step: StepWeights, factor: jax.Array, tag: str) -> StepWeights:
    """Every feature times a per-step factor [T, B] (renamed ``name*tag``)."""
    features = {f"{k}*{tag}": f * factor for k, f in step.features.items()}
    coefficients = {f"{k}*{tag}": c for k, c in step.coefficients.items()}
    return StepWeights(features, coefficients)


def _clipped(
    batch: Trajectory,
    log_ratio: jax.Array | None,
    step: StepWeights,
    advantages: jax.Array,
    aggregate: Callable,
    clip_eps: float,
    dual_clip: float | None = None,
) -> Surrogate:
    """The clipped ratio objective aggregate(min(r A, clip(r, 1 +- eps) A)) (PPO,
    Schulman et al. 2017), with Ye et al. 2020's max(., c A) for A < 0 if
    ``dual_clip``; ``step`` are its on-policy weights (w_t proportional to A_t).

    Its gradient is the weighting w_t r_t on the steps whose unclipped branch is
    active (A > 0 and r <= 1 + eps, or A < 0 and 1 - eps <= r (<= c)), 0 elsewhere.
    On-policy (``log_ratio`` None) the weights are ``step`` itself.
    """
    if log_ratio is None:
        return Surrogate(step)
    mask = batch.mask.astype(jnp.float32)
    ratio = jnp.exp(log_ratio)
    advantages = _zero_padding(sg(advantages), mask)
    positive = step.dense() > 0
    active = jnp.where(positive, ratio <= 1.0 + clip_eps, ratio >= 1.0 - clip_eps)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = jnp.minimum(ratio * advantages, clipped)
    tag = f"clip({clip_eps!r})"
    if dual_clip is not None:
        active &= positive | (ratio <= dual_clip)
        objective = jnp.where(
            advantages < 0, jnp.maximum(objective, dual_clip * advantages), objective
        )
        tag = f"clip({clip_eps!r}, {dual_clip!r})"
    weights = _scaled(step, jnp.where(active, ratio, 0.0), tag)
    outside = jnp.abs(ratio - 1.0) > clip_eps
    return Surrogate(
        weights,
        objective=-aggregate(objective, mask),
        approx_kl=_per_live_step((ratio - 1.0) - log_ratio, mask),
        clip_fraction=_per_live_step(outside.astype(jnp.float32), mask),
    )


# ----------------------------------------------------------------- on-policy estimators


def _reinforce(batch: Trajectory, inputs: WeightInputs) -> Surrogate:
    """REINFORCE with the total return (Williams 1992).

    Loss = -(1/n) sum_i sum_t m_t log pi(a_t|s_t) R(tau_i),   n = B,

    the seed's surrogate; grad J = E[sum_t grad log pi(a_t|s_t) R(tau)]. R(tau_i) is the
    return of the episode containing step t (``returns.total_return``), so streaming
    batches work too. Weights w_t = R(tau_i) / B.
    """
    num_columns = batch.mask.shape[1]
    return Surrogate(
        _column_weights(batch, "return", _return_feature(batch), 1.0 / num_columns)
    )


def _reward_to_go(batch: Trajectory, inputs: WeightInputs) -> Surrogate:
    """REINFORCE with the reward-to-go (causality; OpenAI Spinning Up, "EGLP lemma").

    Loss = -(1/B) sum_i sum_t m_t log pi(a_t|s_t) G_t,   G_t = sum_{t' >= t} r_{t'},

    unbiased because rewards before t do not depend on a_t: E[grad log pi(a_t|s_t) r_k]
    = 0 for k < t. Weights w_t = G_t / B.
    """
    to_go = _reward_to_go_feature(batch)
    return Surrogate(
        _column_weights(batch, "reward_to_go", to_go, 1.0 / batch.mask.shape[1])
    )


def _constant_baseline(
    batch: Trajectory, inputs: WeightInputs, *, b: float = 0.0
) -> Surrogate:
    """REINFORCE with a fixed baseline b (unbiased for any constant b).

    Loss = -(1/B) sum_i sum_t m_t log pi(a_t|s_t) (R(tau_i) - b); w_t = (R_i - b) / B.

    Args:
      b: the baseline.
    """
    num_columns = batch.mask.shape[1]
    return Surrogate(
        _merge(
            _column_weights(batch, "return", _return_feature(batch), 1.0 / num_columns),
            _column_weights(batch, SCORE, _score_feature(batch), -b / num_columns),
        )
    )


def _mean_baseline_advantages(batch: Trajectory, group_size: int | None) -> jax.Array:
    """[B] R_i - mean_{j in g(i)} R_j."""
    total = _episode_returns(batch)
    return total - _group_mean(total, group_size)


def _mean_baseline(
    batch: Trajectory, inputs: WeightInputs, *, group_size: int | None = None
) -> Surrogate:
    """REINFORCE with the group mean return as baseline, the sample itself included.

    Loss = -(1/B) sum_i (R_i - mean_{j in g(i)} R_j) sum_t m_t log pi(a_t|s_t).

    Trajectory-level. Because the mean includes R_i, the expected gradient is
    (G-1)/G grad J for groups of G independent episodes of the same level (RLOO's
    k/(k-1) rescaling removes exactly this).

    Args:
      group_size: G; None for the whole batch.
    """
    return Surrogate(
        _score_weights(batch, _mean_baseline_advantages(batch, group_size))
    )


def _rloo_advantages(batch: Trajectory, group_size: int | None) -> jax.Array:
    """[B] R_i - (1/(G-1)) sum_{j in g(i), j != i} R_j."""
    size = batch.mask.shape[1] if group_size is None else group_size
    if size < 2:
        raise ValueError(f"rloo needs groups of at least 2 columns, got {size}.")
    total = _episode_returns(batch)
    return total - _group_sum_others(total, group_size) / (size - 1)


def _rloo(
    batch: Trajectory, inputs: WeightInputs, *, group_size: int | None = None
) -> Surrogate:
    """REINFORCE leave-one-out: each return's baseline is the mean of the others.

    b_i = (1/(G-1)) sum_{j in g(i), j != i} R_j,
    Loss = -(1/B) sum_i (R_i - b_i) sum_t m_t log pi(a_t|s_t),

    unbiased because b_i is independent of tau_i; R_i - b_i = G/(G-1) (R_i - mean).
    Kool, van Hoof, Welling 2019 ("Buy 4 REINFORCE samples, get a baseline for free!");
    Ahmadian et al. 2024 ("Back to Basics", RLOO for LLMs). Trajectory-level.

    Args:
      group_size: G >= 2 columns of one level per group; None for the whole batch.
    """
    return Surrogate(_score_weights(batch, _rloo_advantages(batch, group_size)))


def _optimal_baseline(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    variant: str = "scalar",
    leave_one_out: bool = True,
    group_size: int | None = None,
) -> Surrogate:
    """REINFORCE with the variance-minimising constant baseline.

    With the per-trajectory score s_i = grad log p(tau_i) = sum_t m_t grad log
    pi(a_t|s_t) (computed with ``jax.vmap(jax.grad(.))`` over the columns):

    * ``variant="scalar"`` (Greensmith, Bartlett, Baxter 2004, JMLR 5):
      b* = E[||s||^2 R] / E[||s||^2], minimising the total variance (trace);
    * ``variant="per_parameter"`` (Mohamed et al. 2020, JMLR 21, sec. 7.4):
      b*_k = E[R s_k^2] / E[s_k^2], one baseline per parameter component k
      (``optimal_baseline_per_parameter``, which is no weighting of scores).

    The expectations are estimated from the batch. With ``leave_one_out=True`` (default)
    trajectory i uses b_{-i} estimated from the other members of its group only,

      b_{-i} = sum_{j != i} w_j R_j / sum_{j != i} w_j,  w = ||s||^2 (or s_k^2),

    which is independent of tau_i, so the estimate
    g = (1/B) sum_i s_i (R_i - b_{-i}) stays unbiased. With ``leave_one_out=False`` the
    whole group (i included) is used, which correlates b with s_i and biases the
    estimate by O(1/G). A denominator of 0 (no other trajectory with a nonzero score)
    gives b = 0. The scalar form weights every step of trajectory i by
    (R_i - b_i) / B. Memory: B copies of the parameters. Trajectory-level.

    Args:
      variant: "scalar" or "per_parameter".
      leave_one_out: estimate each trajectory's baseline without it (unbiased).
      group_size: estimate the baseline within groups of G columns; None for the batch.
    """
    if variant != "scalar":
        raise ValueError(
            "optimal_baseline: only variant='scalar' is a weighting of per-step "
            f"scores, got variant={variant!r}."
        )
    total = _episode_returns(batch)
    baseline = _weighted_return_baseline(
        total, inputs.score_sq_norms, leave_one_out=leave_one_out, group_size=group_size
    )
    return Surrogate(_score_weights(batch, total - baseline))


def optimal_baseline_per_parameter_from_scores(
    batch: Trajectory,
    scores: jax.Array,
    *,
    leave_one_out: bool = True,
    group_size: int | None = None,
) -> jax.Array:
    """REINFORCE with one variance-minimising baseline per parameter component,
    b*_k = E[R s_k^2] / E[s_k^2] (Mohamed et al. 2020, JMLR 21, sec. 7.4).

    The estimate from per-trajectory scores s_i = sum_t m_t grad log pi(a_t|s_t)
    ([B, P], flat): g_k = (1/B) sum_i s_ik (R_i - b_{-i,k}), with b_{-i,k} from the
    other members of i's group if ``leave_one_out`` (unbiased), else from the whole
    group. Not a weighting of per-step scores (the baseline differs per component);
    the loss's gradient is exactly -g, its value the REINFORCE surrogate's (the
    baseline term is 0 in value). Trajectory-level.

    Args:
      leave_one_out: estimate b_k from the other members of the group only.
      group_size: G; None for the whole batch.

    Returns:
      [P] the estimate g.
    """
    total = _episode_returns(batch)
    s = scores.T  # [P, B]: the batch axis contiguous for the sums over it
    baseline = _weighted_return_baseline(
        total, jnp.square(s), leave_one_out=leave_one_out, group_size=group_size
    )
    return _sum_last(s * (total - baseline))[..., 0] / scores.shape[0]


def _weighted_return_baseline(
    total: jax.Array,
    weights: jax.Array,
    *,
    leave_one_out: bool,
    group_size: int | None,
) -> jax.Array:
    """b_i = sum_j w_j R_j / sum_j w_j over i's group (j != i if ``leave_one_out``);
    weights [..., B] -> b [..., B], 0 where the denominator is 0.

    Computed as c + sum_j w_j (R_j - c) / sum_j w_j with c the first return of the
    group: a group whose returns are all equal gets b = R exactly (so R - b = 0,
    as the estimator's exact value), and R - b keeps its digits when returns vary
    little against their size.
    """
    if group_size == 1 and not leave_one_out:  # each return its own baseline
        raise ValueError(
            "optimal_baseline with leave_one_out=False needs group_size >= 2 (or "
            "None, the whole batch): in groups of 1 the baseline is the return "
            "itself, a gradient of 0"
        )
    first = _grouped_last(total, group_size)[..., :1]
    shift = jnp.broadcast_to(first, _grouped_last(total, group_size).shape)
    shift = shift.reshape(total.shape)
    if leave_one_out:
        num = _group_sum_others(weights * (total - shift), group_size)
        den = _group_sum_others(weights, group_size)
    else:
        num = _group_sum(weights * (total - shift), group_size)
        den = _group_sum(weights, group_size)
    return jnp.where(den > 0, shift + _safe_div(num, den), 0.0)


def _value_baseline(batch: Trajectory, inputs: WeightInputs) -> Surrogate:
    """Reward-to-go with a learned state-value baseline, plus the critic's regression.

    A_t = G_t - stop_gradient(V(s_t)),  G_t = sum_{t' >= t} r_{t'} (Monte Carlo, no
    bootstrap), V from ``apply_fn(params, .)``;
    pg_loss = -(1/B) sum_i sum_t m_t A_t log pi(a_t|s_t),
    value_loss = (1/B) sum_i sum_t m_t 0.5 (V(s_t) - G_t)^2,
    loss = pg_loss + vf_coef value_loss - ent_coef (1/B) sum m H(pi(.|s_t)).

    A baseline that depends on s_t but not a_t keeps the policy gradient unbiased
    (Williams 1992; Sutton et al. 2000). With ``vf_coef > 0`` the gradient also trains
    the critic; ``aux.pg_loss`` and ``aux.value_loss`` are reported separately.
    """
    mask = batch.mask.astype(jnp.float32)
    to_go = returns_lib.batch_reward_to_go(batch.rewards, mask, _done(batch))
    advantages = to_go - _zero_padding(inputs.values, mask)
    weights = _column_weights(
        batch, "reward_to_go_minus_value", advantages, 1.0 / mask.shape[1]
    )
    return Surrogate(weights, value_targets=to_go)


def _gae(
    batch: Trajectory, inputs: WeightInputs, *, gamma: float = 0.99, lam: float = 0.95
) -> Surrogate:
    """Advantage actor-critic with generalized advantage estimation.

    A_t = GAE(gamma, lam) (Schulman et al. 2016, arXiv:1506.02438; see ``returns.gae``)
    from the collection-time ``batch.values`` / ``batch.next_values`` (the critic that
    produced the bootstrap values, as in PPO; equal to the current critic when the batch
    was just collected with ``params``);
    pg_loss = -(1/B) sum_i sum_t m_t A_t log pi(a_t|s_t),
    value_loss = (1/B) sum m 0.5 (V(s_t) - (A_t + values_t))^2 with V recomputed,
    loss = pg_loss + vf_coef value_loss - ent_coef (1/B) sum m H.

    With gamma = lam = 1 the advantage is the reward-to-go minus V(s_t) plus V at
    truncations, unbiased for J = E[sum_t r_t] when nothing is truncated; gamma < 1 or
    lam < 1 trade bias for variance.

    Args:
      gamma: discount.
      lam: GAE lambda.
    """
    name, advantages = _gae_feature(batch, gamma, lam, None)
    weights = _column_weights(batch, name, advantages, 1.0 / batch.mask.shape[1])
    return Surrogate(weights, value_targets=advantages + batch.values)


def _ppo_clip(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
    clip_eps: float = 0.2,
    normalize_advantages: bool = True,
    advantages: jax.Array | None = None,
) -> Surrogate:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347).

    r_t = pi(a_t|s_t) / pi_behaviour(a_t|s_t) = exp(log pi - batch.log_probs),
    pg_loss = -(1/B) sum_i sum_t m_t min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t),
    loss = pg_loss + vf_coef value_loss - ent_coef (1/B) sum m H,

    A_t = GAE from the batch's collection-time values (as in ``gae``), optionally
    normalised to zero mean and unit std over the batch's live steps. The value loss is
    unclipped, as in ``gae``, unless ``clip_value_loss``. Its gradient is the weighting
    w_t = r_t A_t / B on the steps whose unclipped branch is active (0 on clipped
    ones); at r = 1 with ``normalize_advantages=False`` it equals ``gae``'s. Biased
    for grad J(theta) under lag (the clip).

    Args:
      gamma: discount.
      lam: GAE lambda.
      clip_eps: ratio clip epsilon.
      normalize_advantages: normalise A over the batch (the usual PPO default).
      advantages: [T, B] precomputed GAE (then ``gamma`` and ``lam`` are unused),
        for minibatches of shuffled single transitions whose GAE was computed once
        over the whole batch.
    """
    return _ppo_body(
        batch, inputs, gamma, lam, clip_eps, normalize_advantages, advantages, None
    )


def _ppo_body(
    batch, inputs, gamma, lam, clip_eps, normalize_advantages, advantages, dual_clip
) -> Surrogate:
    """PPO's clipped policy term (dual-clipped if ``dual_clip``) and GAE targets."""
    step, raw, normalised = _ppo_weights(
        batch, gamma, lam, normalize_advantages, advantages
    )
    log_ratio = _log_ratio(batch, inputs)
    surrogate = _clipped(
        batch, log_ratio, step, normalised, _per_trajectory, clip_eps, dual_clip
    )
    return surrogate._replace(value_targets=raw + batch.values)


def _ppo_weights(batch, gamma, lam, normalize_advantages, advantages):
    """(on-policy weights, raw GAE, the advantages of the objective)."""
    name, raw = _gae_feature(batch, gamma, lam, advantages)
    raw = sg(raw)
    mask = batch.mask.astype(jnp.float32)
    num_columns = mask.shape[1]
    if not normalize_advantages:
        return _column_weights(batch, name, raw, 1.0 / num_columns), raw, raw
    mean = _per_live_step(raw, mask)
    scale = jnp.sqrt(_per_live_step(jnp.square(raw - mean), mask)) + 1e-8
    step = _merge(
        _column_weights(batch, name, raw, 1.0 / (num_columns * scale)),
        _column_weights(
            batch, SCORE, _score_feature(batch), -mean / (num_columns * scale)
        ),
    )
    return step, raw, _normalize(raw, mask)


def _grpo_advantages(batch: Trajectory, group_size: int | None, eps) -> jax.Array:
    """[B] (R_i - mean_g R) / (std_g R + eps), population std."""
    total = _episode_returns(batch)
    mean = _group_mean(total, group_size)
    std = jnp.sqrt(_group_mean(jnp.square(total - mean), group_size))
    return (total - mean) / (std + eps)


def _group_relative(
    batch: Trajectory,
    inputs: WeightInputs,
    advantages: jax.Array,
    length_normalize: bool,
    clip_eps: float,
) -> Surrogate:
    """GRPO's and Dr. GRPO's clipped policy term; advantages [B], one per sequence."""
    num_steps = batch.mask.shape[0]
    if length_normalize:
        lengths = jnp.maximum(jnp.sum(batch.mask.astype(jnp.float32), axis=0), 1.0)
        step = _score_weights(batch, advantages / lengths)
    else:
        step = _score_weights(batch, advantages / num_steps)
    aggregate = _per_sequence_mean if length_normalize else _per_token_budget
    per_step = jnp.broadcast_to(advantages, batch.mask.shape)
    log_ratio = _log_ratio(batch, inputs)
    return _clipped(batch, log_ratio, step, per_step, aggregate, clip_eps)


def _grpo(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    group_size: int | None = None,
    clip_eps: float = 0.2,
    eps: float = 1e-4,
) -> Surrogate:
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath).

    Over the G rollouts of one level (a "prompt"), the outcome advantage given to every
    step of rollout i is

      A_i = (R_i - mean_g R) / (std_g R + eps)     (population std, ddof = 0),

    and the loss averages per-sequence means of a clipped ratio term (per token):

      loss = -(1/B) sum_i (1/|o_i|) sum_t m_t [min(r_t A_i, clip(r_t, 1-eps_c, 1+eps_c)
             A_i) - beta KL_t],   |o_i| = sum_t m_t (at least 1),

    with r_t = pi / pi_behaviour (``batch.log_probs``) and the k3 estimator
    KL_t = pi_ref/pi - log(pi_ref/pi) - 1 to a reference policy ``ref_params`` (needed
    when beta > 0; the KL term's default beta = 0 matches common practice since Dr. GRPO
    and DAPO). The std division and the 1/|o_i| weights make the expected gradient
    differ from grad J in direction, not just scale (Liu et al. 2025). ``eps`` keeps a
    group of equal returns at A = 0. Trajectory-level; groups of ``group_size`` columns.
    The entropy bonus is aggregated like the policy term.

    Args:
      group_size: G, columns per level; None for the whole batch.
      clip_eps: ratio clip epsilon.
      eps: added to the group std.
    """
    advantages = _grpo_advantages(batch, group_size, eps)
    return _group_relative(batch, inputs, advantages, True, clip_eps)


def _dr_grpo(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    group_size: int | None = None,
    clip_eps: float = 0.2,
) -> Surrogate:
    """Dr. GRPO, "GRPO done right" (Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective").

    A_i = R_i - mean_g R (no std division), given to every step, and no per-sequence
    length normalisation; the sum is divided by the constant B * T instead (T = the
    batch's time dimension, the generation budget of the paper's MAX_TOKENS):

      loss = -(1/(B T)) sum_i sum_t m_t [min(r_t A_i, clip(r_t, 1-eps_c, 1+eps_c) A_i)
             - beta KL_t].

    At r = 1 the expected gradient is (G-1)/(G T) grad J: the group mean includes the
    sample itself (see ``mean_baseline``). Trajectory-level. The entropy bonus is
    aggregated like the policy term.

    Args:
      group_size: G, columns per level; None for the whole batch.
      clip_eps: ratio clip epsilon.
    """
    advantages = _mean_baseline_advantages(batch, group_size)
    return _group_relative(batch, inputs, advantages, False, clip_eps)


# --------------------------------------------------------------- off-policy estimators
#
# Data from a behaviour mu (``batch.log_probs`` = log mu(a_t|s_t)), gradient wanted at
# a target pi_theta (the params): rho_t = pi_theta(a_t|s_t) / mu(a_t|s_t) enters the
# weights as a number (``WeightInputs.log_probs``), so each gradient is still
# sum_t w_t grad log pi_theta(a_t|s_t). On-policy (no target log-probs, or ratios
# exactly 1) every importance-weighted estimator's weights are its on-policy
# counterpart's bit for bit. Formulas: ../shared REFERENCE.md section 13.


def _naive(batch: Trajectory, inputs: WeightInputs) -> Surrogate:
    """Naive off-policy gradient: the on-policy reward-to-go formula on the
    behaviour's data, ignoring the ratio: w_t = G_t / B. Biased once pi != mu."""
    return _reward_to_go(batch, inputs)


def _trajectory_is(batch: Trajectory, inputs: WeightInputs) -> Surrogate:
    """Trajectory-level importance sampling (the likelihood-ratio form of
    REINFORCE; e.g. Precup, Sutton, Singh 2000; Degris et al. 2012):

      g = (1/B) sum_i rho_{0:T-1}^(i) R(tau_i) sum_t grad log pi_theta(a_t|s_t),

    rho_{0:T-1} = prod_t pi_theta / mu over the episode. Unbiased for grad J(theta)
    (E_mu[rho f] = E_pi[f]); its variance grows like exp(T KL), the Kish ESS of
    the rho_i collapses first. The loss value is -(1/B) sum_i rho_i R_i, the IS
    estimate of -J(theta). Episodic batches (one episode per column).
    """
    base = _reinforce(batch, inputs).weights
    log_ratio = _log_ratio(batch, inputs)
    if log_ratio is None:
        return Surrogate(base)
    rho = jnp.exp(jnp.sum(log_ratio, axis=0))  # [B]
    objective = -jnp.mean(rho * _episode_returns(batch))
    return Surrogate(
        _scaled(base, jnp.broadcast_to(rho, log_ratio.shape), "trajectory_ratio"),
        objective=objective,
    )


def _cumulative_ratio_reward_to_go(
    batch: Trajectory, inputs: WeightInputs, truncation: float | None
) -> Surrogate:
    """w_t = (1/B) sum_{t' >= t} prod_{k <= t'} rho~_k r_t', rho~ = rho or
    min(rho, truncation); on-policy the reward-to-go's weights."""
    log_ratio = _log_ratio(batch, inputs)
    if log_ratio is None:
        return _reward_to_go(batch, inputs)
    tag = "per_decision_ratio"
    if truncation is not None:
        log_ratio = jnp.minimum(log_ratio, jnp.log(truncation))
        tag = f"truncated_ratio({truncation!r})"
    mask = batch.mask.astype(jnp.float32)
    weighted = batch.rewards * jnp.exp(jnp.cumsum(log_ratio, axis=0))
    to_go = returns_lib.batch_reward_to_go(weighted, mask, _done(batch))
    num_columns = mask.shape[1]
    step = _column_weights(batch, f"reward_to_go*{tag}", to_go, 1.0 / num_columns)
    objective = None
    if truncation is None:
        objective = -_per_trajectory(weighted, mask)
    clipped = (log_ratio < _log_ratio(batch, inputs)).astype(jnp.float32)
    return Surrogate(
        step, objective=objective, clip_fraction=_per_live_step(clipped, mask)
    )


def _per_decision_is(batch: Trajectory, inputs: WeightInputs) -> Surrogate:
    """Per-decision importance sampling (Precup, Sutton, Singh 2000):

      g = (1/B) sum_i sum_t grad log pi_theta(a_t|s_t) sum_{t' >= t} rho_{0:t'} r_t',

    each reward weighted by the ratios of the actions before it only. Unbiased for
    grad J(theta), with less variance than trajectory IS. The loss value is
    -(1/B) sum_i sum_t rho_{0:t} r_t (the per-decision IS estimate of -J). Episodic
    batches. At rho = 1 the weights are ``reward_to_go``'s bit for bit.
    """
    return _cumulative_ratio_reward_to_go(batch, inputs, None)


def _truncated_is(
    batch: Trajectory, inputs: WeightInputs, *, truncation: float = 1.0
) -> Surrogate:
    """Truncated per-decision importance sampling: per-decision IS with
    min(rho_t, c) in place of rho_t (c = ``truncation``; c = 1 as in Retrace,
    Munos et al. 2016, and V-trace, Espeholt et al. 2018):

      g = (1/B) sum_i sum_t grad log pi_theta(a_t|s_t) sum_{t' >= t}
          prod_{k <= t'} min(rho_k, c) r_t'.

    Biased (the truncated mass is dropped); bounded weights. ``clip_fraction`` is
    the fraction of truncated steps. Episodic batches. The loss value is the
    plain surrogate -(1/B) sum w_t log pi_theta(a_t|s_t) (not an estimate of -J,
    unlike ``per_decision_is``'s and ``trajectory_is``'s).

    Args:
      truncation: c > 0, the per-step ratio cap.
    """
    return _cumulative_ratio_reward_to_go(batch, inputs, truncation)


def _ppo_dual_clip(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
    clip_eps: float = 0.2,
    dual_clip: float = 3.0,
    normalize_advantages: bool = True,
    advantages: jax.Array | None = None,
) -> Surrogate:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
    Deep RL", arXiv:1912.09729): ``ppo_clip``'s objective, and for A_t < 0 also
    max(., c A_t), so a large ratio on a negative advantage cannot push the loss
    without bound:

      pg_loss = -(1/B) sum m [A >= 0: min(r A, clip(r) A);
                               A < 0: max(min(r A, clip(r) A), c A)].

    Its gradient is w_t = r_t A_t / B where the unclipped branch is active
    (A > 0, r <= 1 + eps; A < 0, 1 - eps <= r <= c), else 0. Biased under lag.

    Args:
      gamma: discount.
      lam: GAE lambda.
      clip_eps: ratio clip epsilon.
      dual_clip: c > 1, the lower bound c A on a negative advantage's term.
      normalize_advantages: normalise A over the batch.
      advantages: [T, B] precomputed GAE (then ``gamma`` and ``lam`` are unused).
    """
    return _ppo_body(
        batch, inputs, gamma, lam, clip_eps, normalize_advantages, advantages, dual_clip
    )


def _gspo(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    group_size: int | None = None,
    clip_eps: float = 4e-4,
    eps: float = 1e-4,
) -> Surrogate:
    """Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071):
    GRPO's group-normalised advantage A_i with one ratio per sequence,

      s_i = exp((1/|o_i|) sum_t log rho_{i,t}),
      loss = -(1/B) sum_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps) A_i),

    clipped at the sequence level with a small eps (the paper: about 3e-4 to 4e-4).
    Gradient: w_t = s_i A_i / (B |o_i|) on the sequences whose unclipped branch is
    active, 0 on the others; at s = 1 ``grpo``'s weights bit for bit. Biased under
    lag. Trajectory-level.

    Args:
      group_size: G, columns per level; None for the whole batch.
      clip_eps: sequence-ratio clip epsilon.
      eps: added to the group std.
    """
    advantages = _grpo_advantages(batch, group_size, eps)
    lengths = jnp.maximum(jnp.sum(batch.mask.astype(jnp.float32), axis=0), 1.0)
    step = _score_weights(batch, advantages / lengths)
    log_ratio = _log_ratio(batch, inputs)
    if log_ratio is not None:
        sequence = jnp.sum(log_ratio, axis=0) / lengths  # [B] log s_i
        log_ratio = _zero_padding(
            jnp.broadcast_to(sequence, log_ratio.shape), batch.mask
        )
    per_step = jnp.broadcast_to(advantages, batch.mask.shape)
    surrogate = _clipped(batch, log_ratio, step, per_step, _per_sequence_mean, clip_eps)
    return surrogate


def _cispo(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    group_size: int | None = None,
    eps: float = 1e-4,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
) -> Surrogate:
    """CISPO, clipped IS-weight policy optimisation (MiniMax-M1 report 2025,
    arXiv:2506.13585): the IS weight is clipped and stop-gradiented, so no token
    loses its gradient:

      loss = -(1/N) sum_i sum_t m sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) A_i
             log pi_theta(a_t|s_t),   N = sum_{i,t} m (token mean),

    A_i GRPO's group-normalised advantage. The report sets no lower bound (a large
    eps_low; 1.0 here, a bound of 0) and tunes eps_high (0.28 here, DAPO's
    clip-higher value). Weights w_t = clip(rho_t) A_i / N. Biased under lag (the
    clip). ``clip_fraction`` is the fraction of clipped tokens. Trajectory-level.

    Args:
      group_size: G, columns per level; None for the whole batch.
      eps: added to the group std.
      eps_low: the weight's lower clip 1 - eps_low.
      eps_high: the weight's upper clip 1 + eps_high.
    """
    mask = batch.mask.astype(jnp.float32)
    advantages = _grpo_advantages(batch, group_size, eps)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    step = _column_weights(batch, SCORE, _score_feature(batch), advantages / tokens)
    log_ratio = _log_ratio(batch, inputs)
    if log_ratio is None:
        return Surrogate(step)
    ratio = jnp.exp(log_ratio)
    weight = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    tag = f"cispo({eps_low!r}, {eps_high!r})"
    clipped = (weight != ratio).astype(jnp.float32)
    return Surrogate(
        _scaled(step, weight, tag),
        approx_kl=_per_live_step((ratio - 1.0) - log_ratio, mask),
        clip_fraction=_per_live_step(clipped, mask),
    )


def _vtrace_returns(
    batch: Trajectory, values: jax.Array, rho: jax.Array, gamma, lam, c_bar, rho_bar
) -> tuple[jax.Array, jax.Array]:
    """([T, B] v_s, [T, B] V(s_{t+1}) bootstraps) of V-trace (Espeholt et al. 2018):
    v_s = V(s) + sum_{t >= s} gamma^(t-s) (prod_{i=s..t-1} c_i) delta_t,
    delta_t = min(rho_bar, rho_t) (r_t + gamma V(s_{t+1}) - V(s_t)),
    c_i = lam min(c_bar, rho_i); no bootstrap after a termination, the batch's
    next_values after a truncation; the recursion stops at each episode's end."""
    live = _live(batch.mask)
    values = _zero_padding(values, batch.mask)
    done = _done(batch) | ~live
    following = jnp.concatenate([values[1:], jnp.zeros_like(values[:1])])
    bootstrap = jnp.where(batch.truncated, batch.next_values, following)
    bootstrap = _zero_padding(jnp.where(batch.terminated, 0.0, bootstrap), batch.mask)
    rewards = _zero_padding(batch.rewards.astype(jnp.float32), batch.mask)
    delta = jnp.minimum(rho_bar, rho) * (rewards + gamma * bootstrap - values)
    delta = _zero_padding(delta, batch.mask)
    carry_on = jnp.where(done, 0.0, gamma * lam * jnp.minimum(c_bar, rho))

    def step(acc, x):
        d, k = x
        acc = d + k * acc
        return acc, acc

    _, corrections = jax.lax.scan(
        step, jnp.zeros(values.shape[1:]), (delta, carry_on), reverse=True
    )
    return values + corrections, bootstrap


def _vtrace(
    batch: Trajectory,
    inputs: WeightInputs,
    *,
    gamma: float = 0.99,
    lam: float = 1.0,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    pg_rho_bar: float = 1.0,
) -> Surrogate:
    """The V-trace actor-critic policy gradient (Espeholt et al. 2018, IMPALA,
    arXiv:1802.01561), with the current critic V (``apply_fn``'s values):

      w_s = min(pg_rho_bar, rho_s) (r_s + gamma q_{s+1} - V(s_s)) / B,
      q_{s+1} = lam v_{s+1} + (1 - lam) V(s_{s+1})   (v_{s+1} at lam = 1, the paper),

    v the V-trace targets (``_vtrace_returns``), which the value term regresses
    V(s_s) on; q is rlax's lambda-mixed bootstrap. Biased under lag (truncated ratios; gamma < 1 and lam < 1 add
    more); on-policy (rho = 1) with lam = 1 the advantage is the bootstrapped
    n-step return minus V. ``rlax.vtrace_td_error_and_advantage`` computes the
    same quantities.

    Args:
      gamma: discount.
      lam: lambda of the traces c_i = lam min(c_bar, rho_i).
      rho_bar: truncation of the TD errors' ratios.
      c_bar: truncation of the traces' ratios.
      pg_rho_bar: truncation of the policy gradient's ratio.
    """
    log_ratio = _log_ratio(batch, inputs)
    ones = jnp.ones(batch.mask.shape, jnp.float32)
    rho = ones if log_ratio is None else jnp.exp(log_ratio)
    vs, bootstrap = _vtrace_returns(
        batch, inputs.values, rho, gamma, lam, c_bar, rho_bar
    )
    values = _zero_padding(inputs.values, batch.mask)
    mixed = lam * vs[1:] + (1.0 - lam) * values[1:]
    following = jnp.concatenate([mixed, jnp.zeros_like(vs[:1])])
    next_vs = jnp.where(_done(batch), bootstrap, following)
    rewards = _zero_padding(batch.rewards.astype(jnp.float32), batch.mask)
    advantage = jnp.minimum(pg_rho_bar, rho) * (rewards + gamma * next_vs - values)
    name = _feature_key("vtrace", gamma, lam, rho_bar, c_bar, pg_rho_bar)
    step = _column_weights(batch, name, advantage, 1.0 / batch.mask.shape[1])
    truncated = (rho > jnp.minimum(pg_rho_bar, rho)).astype(jnp.float32)
    mask = batch.mask.astype(jnp.float32)
    return Surrogate(
        step,
        value_targets=vs,
        approx_kl=0.0
        if log_ratio is None
        else _per_live_step((rho - 1.0) - log_ratio, mask),
        clip_fraction=_per_live_step(truncated, mask),
    )


# ------------------------------------------------------------ the losses and weights

reinforce = surrogate_loss(_reinforce)
reward_to_go = surrogate_loss(_reward_to_go)
constant_baseline = surrogate_loss(_constant_baseline)
mean_baseline = surrogate_loss(_mean_baseline)
rloo = surrogate_loss(_rloo)
_optimal_baseline_scalar = surrogate_loss(_optimal_baseline, score_norms=True)
optimal_baseline_per_parameter = scores_loss(
    optimal_baseline_per_parameter_from_scores,
    "optimal_baseline_per_parameter",
    value=_reinforce,
)
value_baseline = surrogate_loss(_value_baseline, value_regression(), entropy_bonus())
gae = surrogate_loss(_gae, value_regression(), entropy_bonus())
ppo_clip = surrogate_loss(
    _ppo_clip, value_regression(clipped=True), entropy_bonus(0.01)
)
grpo = surrogate_loss(
    _grpo, reference_kl(_per_sequence_mean), entropy_bonus(0.0, _per_sequence_mean)
)
dr_grpo = surrogate_loss(
    _dr_grpo, reference_kl(_per_token_budget), entropy_bonus(0.0, _per_token_budget)
)


def optimal_baseline(
    params: Params,
    batch: Trajectory,
    *,
    apply_fn: ApplyFn,
    variant: str = "scalar",
    leave_one_out: bool = True,
    group_size: int | None = None,
) -> tuple[jax.Array, LossAux]:
    """REINFORCE with the variance-minimising constant baseline: the scalar form
    (a weighting of scores, see ``_optimal_baseline``) or, with
    ``variant="per_parameter"``, ``optimal_baseline_per_parameter``.

    Args:
      params: policy params.
      batch: [T, B] episodic trajectories.
      apply_fn: ``apply(params, obs) -> (logits, values)``.
      variant: "scalar" or "per_parameter".
      leave_one_out: estimate each trajectory's baseline without it (unbiased).
      group_size: estimate the baseline within groups of G columns; None for the batch.

    Returns:
      (loss, LossAux).
    """
    loss = _optimal_baseline_scalar
    if variant == "per_parameter":
        loss = optimal_baseline_per_parameter
    elif variant != "scalar":
        raise ValueError(
            f"variant must be 'scalar' or 'per_parameter', got {variant!r}."
        )
    kwargs = {"leave_one_out": leave_one_out, "group_size": group_size}
    if variant == "scalar":
        kwargs["variant"] = variant
    return loss(params, batch, apply_fn=apply_fn, **kwargs)


naive = surrogate_loss(_naive)
trajectory_is = surrogate_loss(_trajectory_is)
per_decision_is = surrogate_loss(_per_decision_is)
truncated_is = surrogate_loss(_truncated_is)
ppo_dual_clip = surrogate_loss(
    _ppo_dual_clip, value_regression(clipped=True), entropy_bonus(0.01)
)
gspo = surrogate_loss(_gspo, entropy_bonus(0.0, _per_sequence_mean))
cispo = surrogate_loss(_cispo, entropy_bonus(0.0))
vtrace = surrogate_loss(_vtrace, value_regression(), entropy_bonus())

reinforce_weights = policy_weights(reinforce)
reward_to_go_weights = policy_weights(reward_to_go)
constant_baseline_weights = policy_weights(constant_baseline)
mean_baseline_weights = policy_weights(mean_baseline)
rloo_weights = policy_weights(rloo)
optimal_baseline_weights = policy_weights(_optimal_baseline_scalar)
value_baseline_weights = policy_weights(value_baseline)
gae_weights = policy_weights(gae)
ppo_clip_weights = policy_weights(ppo_clip)
grpo_weights = policy_weights(grpo)
dr_grpo_weights = policy_weights(dr_grpo)


# ---------------------------------------------------------------------------- registry

Estimator = Callable[..., tuple[jax.Array, LossAux]]


def _unbiased(group_size: int, horizon: int) -> float:
    return 1.0


def _group_mean_shrink(group_size: int, horizon: int) -> float:
    """The group mean includes the sample itself: E = (G-1)/G grad J."""
    return (group_size - 1) / group_size


def _dr_grpo_shrink(group_size: int, horizon: int) -> float:
    """(G-1)/G from the group mean, 1/T from the constant 1/(B T) normaliser."""
    return (group_size - 1) / (group_size * horizon)


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """Everything the library needs to know about one estimator.

    Attributes:
      name: the registry key (and the estimator's name in outputs).
      loss: ``loss(params, batch, *, apply_fn, **hyperparameters) -> (loss, aux)``.
      trajectory_level: uses R(tau_i) per column, so needs episodic batches.
      self_normalised: aggregates its per-token terms itself (GRPO's per-sequence
        means, Dr. GRPO's 1/(B T)); training does not divide its loss by the
        steps per column.
      per_trajectory: its batch estimate is the mean over columns of a function of
        each column alone (so one-column estimates and exact variances exist).
      mean_factor: ``c(G, T)`` with E[g_hat] = c grad J at the on-policy point, if
        known in closed form (1 for unbiased estimators); None if not.
      rescaled: its expected gradient is not on grad J's scale (a shrink factor,
        a normalised advantage): compare it by scale-free metrics only.
      min_group_size: groups of at least this many columns per level.
      checks: per-estimator overrides of the hyperparameter checks, name ->
        (predicate, description).
      study_kwargs: fixed hyperparameters in the variance study (on top of the
        study's value/entropy-free defaults).
      in_study: studied by default in ``rl-pg variance``.
      weights: optional ``weights(batch, inputs, **hyperparameters) -> StepWeights``
        (the loss's hyperparameters, ``apply_fn`` excepted): the loss's gradient at
        the on-policy point as per-step score weights (see ``StepWeights``); the
        variance study computes every such estimator from one forward pass and one
        VJP per sampled batch. It may raise ValueError for hyperparameters under
        which the gradient is no such weighting (value or entropy terms on).
      from_scores: optional ``from_scores(batch, scores, **hyperparameters) -> [P]``
        for an estimator that is no weighting of scores but a function of the
        per-trajectory scores s_i (flat, [B, P]): its estimate -grad loss at the
        on-policy point (the per-parameter optimal baseline); the study uses it as
        it uses ``weights``. An entry with ``from_scores`` and no ``weights`` is
        not a weighting.
      needs_critic: its gradient reads a critic's values (V(s_t) from the params or
        the batch's collection-time values), so a critic-less policy gets a
        meaningless estimate.
      unbiased_off_policy: on data from a behaviour mu != pi_theta (the batch's
        ``log_probs``), E_mu[g_hat] = c grad J(theta) with ``mean_factor``'s c (an
        importance-weighted estimator); False for the on-policy formulas and for
        clipped or truncated ratios.
      in_lag_study: studied by default under policy lag (off-policy estimators).

    A loss built by ``surrogate_loss`` gets its ``weights`` derived
    (``policy_weights``) when the entry gives neither ``weights`` nor
    ``from_scores``.
    """

    name: str
    loss: Estimator
    trajectory_level: bool = False
    self_normalised: bool = False
    per_trajectory: bool = False
    mean_factor: Callable[[int, int], float] | None = None
    rescaled: bool = False
    min_group_size: int = 1
    checks: dict = dataclasses.field(default_factory=dict)
    study_kwargs: dict = dataclasses.field(default_factory=dict)
    in_study: bool = True
    weights: Callable[..., StepWeights] | None = None
    from_scores: Callable[..., jax.Array] | None = None
    needs_critic: bool = False
    unbiased_off_policy: bool = False
    in_lag_study: bool = False

    def __post_init__(self):
        built = getattr(self.loss, "weighting", None)
        if self.weights is None and self.from_scores is None and built is not None:
            object.__setattr__(self, "weights", policy_weights(self.loss))


REGISTRY: dict[str, EstimatorSpec] = {}
ESTIMATORS: dict[str, Estimator] = {}  # name -> loss, the registry's losses


def register(spec: EstimatorSpec) -> EstimatorSpec:
    """Add an estimator to the registry (training, the study and the CLI read it).

    Raises:
      ValueError: for a name already registered, a loss that is not callable or
        whose signature lacks a keyword-only ``apply_fn``.
    """
    if not isinstance(spec, EstimatorSpec):
        raise ValueError(
            f"register() takes an EstimatorSpec, got {type(spec).__name__}"
        )
    if spec.name in REGISTRY:
        raise ValueError(f"an estimator named {spec.name!r} is already registered")
    _check_loss(spec.loss, spec.name)
    _check_weights(spec)
    REGISTRY[spec.name] = spec
    ESTIMATORS[spec.name] = spec.loss
    return spec


def _check_loss(loss: Any, name: str) -> None:
    if not callable(loss):
        raise ValueError(f"estimator {name!r}: loss must be callable, got {loss!r}")
    params = inspect.signature(loss).parameters
    if (
        "apply_fn" not in params
        or params["apply_fn"].kind is not params["apply_fn"].KEYWORD_ONLY
    ):
        raise ValueError(
            f"estimator {name!r}: the loss must have the signature "
            "loss(params, batch, *, apply_fn, **hyperparameters) -> (loss, aux)"
        )


def _check_weights(spec: EstimatorSpec) -> None:
    """``spec.weights`` and ``spec.from_scores`` take the loss's hyperparameters,
    with the same defaults."""
    expected = {k: v for k, v in _keyword_only(spec.loss).items() if k != "apply_fn"}
    for field in ("weights", "from_scores"):
        fn = getattr(spec, field)
        if fn is None:
            continue
        if not callable(fn):
            raise ValueError(f"estimator {spec.name!r}: {field} must be callable")
        if _keyword_only(fn) != expected:
            raise ValueError(
                f"estimator {spec.name!r}: {field} must take the loss's keyword-only "
                f"hyperparameters with the same defaults, {expected}"
            )


def spec(name: str) -> EstimatorSpec:
    """The registered estimator ``name`` (ValueError listing the known ones)."""
    if name not in REGISTRY:
        raise ValueError(
            f"Unknown estimator {name!r}; known estimators: {', '.join(REGISTRY)}."
        )
    return REGISTRY[name]


def resolve(ref: "str | Callable") -> EstimatorSpec:
    """A registered name, a ``module:function`` reference or a loss function ->
    its spec. An unregistered function gets a spec named after the function, with
    nothing assumed about it (not per-trajectory, mean factor unknown)."""
    if callable(ref):
        for known in REGISTRY.values():
            if known.loss is ref:
                return known
        name = getattr(ref, "__name__", None) or repr(ref)
        _check_loss(ref, name)
        return EstimatorSpec(name=name, loss=ref, in_study=False)
    if not isinstance(ref, str):
        raise ValueError(f"an estimator is a name or a function, got {ref!r}")
    if ":" not in ref:
        return spec(ref)
    return resolve(load_function(ref))


def load_function(ref: str) -> Callable:
    """``module:function`` -> the function (modules from the current directory or
    PYTHONPATH; dotted attributes allowed)."""
    import importlib
    import sys

    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected module:function, got {ref!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        obj = sys.modules.get(module_name) or importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of {ref!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no {attr!r} (from {ref!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{ref!r} is not a function")
    return obj


def reference(fn: Callable) -> str:
    """The ``module:function`` reference of an importable function."""
    if isinstance(fn, functools.partial):
        raise ValueError(
            f"{fn!r} is a functools.partial (as get_estimator returns): the study "
            "binds each estimator's hyperparameters itself (group_size, gamma, lam, "
            "b), so give the estimator's name or a loss function defined at a "
            "module's top level"
        )
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(
            f"{fn!r} has no importable module:function reference (define it at a "
            "module's top level)"
        )
    return f"{module}:{qualname}"


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _unit_interval(v: Any) -> bool:
    return _is_number(v) and 0.0 <= v <= 1.0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0.0


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0.0


def _group_size_ok(v: Any, minimum: int = 1) -> bool:
    if v is None:
        return True
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum


# name -> (check, what a valid value is)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "apply_fn": (callable, "a callable apply(params, obs) -> (logits, values)"),
    "b": (_is_number, "a finite number"),
    "gamma": (_unit_interval, "a number in [0, 1]"),
    "lam": (_unit_interval, "a number in [0, 1]"),
    "clip_eps": (lambda v: _positive(v) and v < 1.0, "a number in (0, 1)"),
    "eps": (_positive, "a positive number"),
    "vf_coef": (_non_negative, "a non-negative number"),
    "ent_coef": (_non_negative, "a non-negative number"),
    "beta": (_non_negative, "a non-negative number"),
    "group_size": (_group_size_ok, "None or a positive int"),
    "variant": (
        lambda v: v in ("scalar", "per_parameter"),
        "'scalar' or 'per_parameter'",
    ),
    "leave_one_out": (lambda v: isinstance(v, bool), "a bool"),
    "normalize_advantages": (lambda v: isinstance(v, bool), "a bool"),
    "clip_value_loss": (lambda v: isinstance(v, bool), "a bool"),
    "advantages": (lambda v: v is None, "None (or an array at call time)"),
    "ref_params": (lambda v: True, "a params pytree or None"),
    "truncation": (_positive, "a positive number"),
    "dual_clip": (lambda v: _is_number(v) and v > 1.0, "a number > 1"),
    "eps_low": (lambda v: _positive(v) and v <= 1.0, "a number in (0, 1]"),
    "eps_high": (_positive, "a positive number"),
    "rho_bar": (_positive, "a positive number"),
    "c_bar": (_positive, "a positive number"),
    "pg_rho_bar": (_positive, "a positive number"),
}
_RLOO_GROUPS = {
    "group_size": (
        lambda v: _group_size_ok(v, minimum=2),
        "None or an int >= 2 (leave-one-out needs another sample)",
    ),
}

for _spec in (
    EstimatorSpec(
        "reinforce",
        reinforce,
        per_trajectory=True,
        mean_factor=_unbiased,
        weights=reinforce_weights,
    ),
    EstimatorSpec(
        "reward_to_go",
        reward_to_go,
        per_trajectory=True,
        mean_factor=_unbiased,
        weights=reward_to_go_weights,
    ),
    EstimatorSpec(
        "constant_baseline",
        constant_baseline,
        trajectory_level=True,
        per_trajectory=True,
        mean_factor=_unbiased,
        weights=constant_baseline_weights,
    ),
    EstimatorSpec(
        "mean_baseline",
        mean_baseline,
        trajectory_level=True,
        min_group_size=2,
        mean_factor=_group_mean_shrink,
        rescaled=True,
        weights=mean_baseline_weights,
    ),
    EstimatorSpec(
        "rloo",
        rloo,
        trajectory_level=True,
        mean_factor=_unbiased,
        min_group_size=2,
        checks=_RLOO_GROUPS,
        weights=rloo_weights,
    ),
    EstimatorSpec(
        "optimal_baseline",
        optimal_baseline,
        trajectory_level=True,
        mean_factor=_unbiased,
        study_kwargs={"group_size": None},  # leave-one-out over the whole batch
        weights=optimal_baseline_weights,
    ),
    EstimatorSpec(
        "optimal_baseline_per_parameter",
        optimal_baseline_per_parameter,
        trajectory_level=True,
        mean_factor=_unbiased,
        study_kwargs={"group_size": None},
        from_scores=optimal_baseline_per_parameter_from_scores,
    ),
    EstimatorSpec(
        "value_baseline",
        value_baseline,
        per_trajectory=True,
        mean_factor=_unbiased,
        weights=value_baseline_weights,
        needs_critic=True,
    ),
    EstimatorSpec(
        "gae", gae, per_trajectory=True, weights=gae_weights, needs_critic=True
    ),
    EstimatorSpec(
        "ppo_clip",
        ppo_clip,
        rescaled=True,
        weights=ppo_clip_weights,
        needs_critic=True,
        in_lag_study=True,
    ),
    EstimatorSpec(
        "grpo",
        grpo,
        trajectory_level=True,
        self_normalised=True,
        rescaled=True,
        min_group_size=2,
        weights=grpo_weights,
        in_lag_study=True,
    ),
    EstimatorSpec(
        "dr_grpo",
        dr_grpo,
        trajectory_level=True,
        self_normalised=True,
        min_group_size=2,
        mean_factor=_dr_grpo_shrink,
        rescaled=True,
        weights=dr_grpo_weights,
    ),
    # Off-policy estimators (REFERENCE.md section 13): not in the on-policy study
    # (their on-policy rows would repeat reward_to_go's or grpo's), in the lag study.
    EstimatorSpec(
        "naive",
        naive,
        per_trajectory=True,
        mean_factor=_unbiased,
        in_study=False,
        in_lag_study=True,
    ),
    EstimatorSpec(
        "trajectory_is",
        trajectory_is,
        trajectory_level=True,
        per_trajectory=True,
        mean_factor=_unbiased,
        in_study=False,
        in_lag_study=True,
        unbiased_off_policy=True,
    ),
    EstimatorSpec(
        "per_decision_is",
        per_decision_is,
        trajectory_level=True,
        per_trajectory=True,
        mean_factor=_unbiased,
        in_study=False,
        in_lag_study=True,
        unbiased_off_policy=True,
    ),
    EstimatorSpec(
        "truncated_is",
        truncated_is,
        trajectory_level=True,
        per_trajectory=True,
        mean_factor=_unbiased,
        in_study=False,
        in_lag_study=True,
    ),
    EstimatorSpec(
        "ppo_dual_clip",
        ppo_dual_clip,
        rescaled=True,
        needs_critic=True,
        in_study=False,
        in_lag_study=True,
    ),
    EstimatorSpec(
        "gspo",
        gspo,
        trajectory_level=True,
        self_normalised=True,
        rescaled=True,
        min_group_size=2,
        in_study=False,
        in_lag_study=True,
    ),
    EstimatorSpec(
        "cispo",
        cispo,
        trajectory_level=True,
        self_normalised=True,
        rescaled=True,
        min_group_size=2,
        in_study=False,
        in_lag_study=True,
    ),
    EstimatorSpec(
        "vtrace",
        vtrace,
        per_trajectory=True,
        needs_critic=True,
        in_study=False,
        in_lag_study=True,
    ),
):
    register(_spec)


def hyperparameters(name: "str | Callable") -> tuple[str, ...]:
    """The keyword-only arguments (``apply_fn`` and hyperparameters) of an estimator
    (a registered name or a loss function)."""
    signature = inspect.signature(ESTIMATORS[name] if isinstance(name, str) else name)
    return tuple(
        p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY
    )


def get_estimator(name: str, **kwargs: Any) -> Estimator:
    """Looks up an estimator and binds its keyword arguments.

    Values given as jax arrays or tracers are bound without checking (so hyperparameters
    can be vmapped over); Python values are validated.

    Args:
      name: a key of ``ESTIMATORS``.
      **kwargs: keyword-only arguments of that estimator (``apply_fn`` and
        hyperparameters); the rest can still be passed at call time.

    Returns:
      ``functools.partial(ESTIMATORS[name], **kwargs)``: ``loss(params, batch, ...)``.

    Raises:
      ValueError: for an unknown name, an unknown keyword or an invalid value.
    """
    _validate(name, kwargs)
    return functools.partial(ESTIMATORS[name], **kwargs)


def get_weights(name: str, **kwargs: Any) -> Callable[..., StepWeights]:
    """``get_estimator``'s counterpart for per-step weights.

    Args:
      name: a registered estimator with ``weights``.
      **kwargs: as for ``get_estimator`` (``apply_fn`` is accepted and dropped).

    Returns:
      ``weights(batch, inputs) -> StepWeights`` with the hyperparameters bound.

    Raises:
      ValueError: as ``get_estimator``, or if the estimator declares no weights.
    """
    weights = spec(name).weights
    if weights is None:
        raise ValueError(f"estimator {name!r} declares no per-step weights")
    _validate(name, kwargs)
    kwargs.pop("apply_fn", None)
    return functools.partial(weights, **kwargs)


def _validate(name: str, kwargs: dict) -> None:
    checks = spec(name).checks
    allowed = hyperparameters(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown} for estimator {name!r}; it accepts "
            f"{', '.join(allowed)}."
        )
    for key, value in kwargs.items():
        if isinstance(value, jax.Array) and key != "ref_params":
            continue
        check, description = checks.get(key) or _CHECKS.get(
            key, (lambda v: True, "a value")
        )
        if not check(value):
            raise ValueError(
                f"Invalid {key}={value!r} for estimator {name!r}: "
                f"expected {description}."
            )
    size, minimum = kwargs.get("group_size"), spec(name).min_group_size
    if isinstance(size, numbers.Integral) and size < minimum:
        raise ValueError(
            f"Invalid group_size={size!r} for estimator {name!r}: it compares the "
            f"episodes of a level, so it needs groups of at least {minimum}."
        )
