"""Tests for rl_pg.estimators (and the enumerable MDP they are checked on).

Statistical checks draw M = 20000 independent batches of n = 8 episodes (2 levels x 4)
from the enumerable MDP, compute each estimator's batch gradient estimate g_m with
``jax.vmap(jax.grad(loss))`` and compare the mean over m with the exact gradient.

Bound used throughout: the components compared are d/d logits[s, 0] for the 3 states
(the softmax score makes each row of the logits gradient sum to zero, so the other
column carries no extra information). A mean "agrees" with a target when every
component is within 5 standard errors, SE_k = std_m(g_m,k) / sqrt(M); for an unbiased
estimator that fails with probability < 3 * 6e-7 per check. A mean "clearly differs"
when some component is more than 5 SE away. Seeds are fixed, so results are
reproducible.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rl_pg import enumerable, estimators, policies
from rl_pg.trajectory import Trajectory, assert_trajectory

MDP = enumerable.DEFAULT_MDP
POLICY = enumerable.mdp_policy(MDP)
PARAMS = {
    "logits": jnp.array([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]]),
    "value": jnp.array([1.0, 2.0, 0.5]),
}
NUM_BATCHES, BATCH, GROUP = 20000, 8, 4
HORIZON = MDP.horizon
Z = 5.0

# Keyword arguments that make each estimator run on the test batches.
DEFAULT_KWARGS = {
    "reinforce": {},
    "reward_to_go": {},
    "constant_baseline": {"b": 2.0},
    "mean_baseline": {"group_size": GROUP},
    "rloo": {"group_size": GROUP},
    "optimal_baseline": {},
    "optimal_baseline_per_parameter": {},
    "value_baseline": {},
    "gae": {},
    "ppo_clip": {},
    "grpo": {"group_size": GROUP},
    "dr_grpo": {"group_size": GROUP},
    "naive": {},
    "trajectory_is": {},
    "per_decision_is": {},
    "truncated_is": {},
    "ppo_dual_clip": {},
    "gspo": {"group_size": GROUP},
    "cispo": {"group_size": GROUP},
    "vtrace": {},
}


def _loss(name, **kwargs):
    kwargs = {**DEFAULT_KWARGS[name], **kwargs}
    return estimators.get_estimator(name, apply_fn=POLICY.apply, **kwargs)


def _value_and_grad(loss, params, batch):
    """((loss, aux), grad) of one estimator (not jitted: see ``_jit_all``)."""
    return jax.value_and_grad(loss, has_aux=True)(params, batch)


def _jit_all(fns: dict):
    """``f(*args) -> {key: fns[key](*args)}`` as one jitted program.

    Compiling one program for many estimators costs about 2.5x less CPU time than
    one program each (XLA's fixed per-program cost dominates for these small losses).
    """
    return jax.jit(lambda *args: {key: fn(*args) for key, fn in fns.items()})


@pytest.fixture(scope="module")
def batches() -> Trajectory:
    sample = functools.partial(
        enumerable.sample_batches, num_batches=NUM_BATCHES, n=BATCH, group_size=GROUP
    )
    return jax.jit(sample)(jax.random.PRNGKey(0), PARAMS)


@pytest.fixture(scope="module")
def exact() -> np.ndarray:
    return np.asarray(enumerable.exact_gradient(PARAMS)["logits"][:, 0], np.float64)


_sample_small = jax.jit(
    functools.partial(enumerable.sample_batch, n=BATCH, group_size=GROUP)
)


@pytest.fixture(scope="module")
def small_batch() -> Trajectory:
    """One batch of 8 episodes (2 levels x 4) with early crashes, hence padding."""
    batch = _sample_small(jax.random.PRNGKey(3), PARAMS)
    assert np.any(np.asarray(batch.mask) == 0)
    return batch


# Estimator configurations whose batch estimates are compared with the exact gradient.
STAT_CONFIGS = {
    "reinforce": ("reinforce", {}),
    "reward_to_go": ("reward_to_go", {}),
    "constant_baseline": ("constant_baseline", {"b": 2.0}),
    "rloo/batch": ("rloo", {"group_size": None}),
    "rloo/group": ("rloo", {"group_size": GROUP}),
    "optimal/scalar": ("optimal_baseline", {}),
    "optimal/per_parameter": ("optimal_baseline", {"variant": "per_parameter"}),
    "optimal/group": ("optimal_baseline", {"group_size": GROUP}),
    "optimal/no_leave_one_out": ("optimal_baseline", {"leave_one_out": False}),
    "value_baseline": ("value_baseline", {"vf_coef": 0.0}),
    "gae/lambda_1": ("gae", {"gamma": 1.0, "lam": 1.0, "vf_coef": 0.0}),
    "ppo/ratio_1": (
        "ppo_clip",
        {
            "gamma": 1.0,
            "lam": 1.0,
            "vf_coef": 0.0,
            "ent_coef": 0.0,
            "normalize_advantages": False,
        },
    ),
    "mean/batch": ("mean_baseline", {"group_size": None}),
    "mean/group": ("mean_baseline", {"group_size": GROUP}),
    "dr_grpo/group": ("dr_grpo", {"group_size": GROUP}),
    "grpo/group": ("grpo", {"group_size": GROUP}),
    "grpo/batch": ("grpo", {"group_size": None}),
}


@pytest.fixture(scope="module")
def estimates(batches) -> dict[str, np.ndarray]:
    """config -> [M, 3] batch estimates of d J / d logits[s, 0] (one jitted call)."""

    def estimates_fn(loss):
        def per_batch(batch):
            return -_value_and_grad(loss, PARAMS, batch)[1]["logits"][:, 0]

        return jax.vmap(per_batch)

    fns = {
        key: estimates_fn(_loss(name, **kw)) for key, (name, kw) in STAT_CONFIGS.items()
    }
    out = _jit_all(fns)(batches)
    return {key: np.asarray(x, np.float64) for key, x in out.items()}


def _z_scores(samples: np.ndarray, target: np.ndarray) -> np.ndarray:
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    return (samples.mean(axis=0) - target) / se


def _scale_fit_chi2(samples: np.ndarray, target: np.ndarray) -> float:
    """Chi-square of the mean against its best multiple c * target (c fitted).

    sum_k ((mean_k - c target_k) / SE_k)^2 with c the weighted least-squares scale.
    If E[g] is parallel to target this is ~chi2 with 2 degrees of freedom
    (P(> 30) < 1e-6); a direction bias makes it grow like M.
    """
    mean = samples.mean(axis=0)
    w = 1.0 / np.square(samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0]))
    c = np.sum(w * mean * target) / np.sum(w * target**2)
    assert c > 0
    return float(np.sum(w * np.square(mean - c * target)))


# ------------------------------------------------------------------- enumerable MDP


@jax.jit
def _dynamic_programming_objective(params):
    """J by backward induction over (t, s); an independent check of the enumeration."""
    pi = jax.nn.softmax(params["logits"], axis=-1)  # [S, A]
    p = jnp.asarray(MDP.transitions)  # [S, A, S + 1]
    r = jnp.asarray(MDP.rewards)
    v_next = jnp.zeros(MDP.num_states)
    for t in reversed(range(HORIZON)):
        cont = v_next if t < HORIZON - 1 else jnp.zeros(MDP.num_states)
        future = jnp.concatenate([cont, jnp.zeros(1)])  # crash: nothing after
        q = jnp.sum(p * (r + future[None, None, :]), axis=-1)  # [S, A]
        v_next = jnp.sum(pi * q, axis=-1)
    return jnp.dot(jnp.asarray(MDP.initial), v_next)


def test_exact_objective_matches_dynamic_programming():
    params = {
        "logits": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)
    }
    np.testing.assert_allclose(
        enumerable.exact_objective(params), _dynamic_programming_objective(params), 1e-5
    )
    np.testing.assert_allclose(
        enumerable.exact_gradient(params)["logits"],
        jax.grad(_dynamic_programming_objective)(params)["logits"],
        atol=1e-5,
    )
    # Trajectory probabilities under the policy sum to one.
    e = enumerable.enumerate_trajectories(MDP)
    log_pi = jax.nn.log_softmax(params["logits"])
    logp = e.log_prob_env + np.sum(e.mask * np.asarray(log_pi)[e.states, e.actions], 1)
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)
    assert np.any(e.mask == 0)  # early termination happens


def test_empty_samples_are_refused():
    with pytest.raises(ValueError, match="n=0 must be a positive multiple"):
        enumerable.sample_batch(jax.random.PRNGKey(0), PARAMS, 0, MDP)
    with pytest.raises(ValueError, match="num_batches=0 must be at least 1"):
        enumerable.sample_batches(jax.random.PRNGKey(0), PARAMS, 0, 4, MDP)


def test_sample_batch_structure(small_batch):
    b = small_batch
    assert_trajectory(b)
    assert b.observations.shape == (HORIZON, 8, MDP.num_states)
    mask = np.asarray(b.mask)
    assert np.all(np.diff(mask, axis=0) <= 0)  # live steps come first
    lengths = mask.sum(0).astype(int)
    term = np.asarray(b.terminated)
    # Exactly one terminated step per column: its last live step.
    np.testing.assert_array_equal(term.sum(0), 1)
    np.testing.assert_array_equal(np.argmax(term, axis=0), lengths - 1)
    assert not np.any(np.asarray(b.truncated))
    obs = np.asarray(b.observations)
    np.testing.assert_array_equal(obs.sum(-1), mask)  # one-hot on live steps
    # Behaviour log-probs are those of PARAMS.
    logits, _ = POLICY.apply(PARAMS, b.observations)
    lp = policies.log_prob(logits, b.actions)
    np.testing.assert_allclose(b.log_probs, np.where(mask > 0, lp, 0.0), atol=1e-6)
    # Groups of 4 columns share a level (the initial state).
    level = np.asarray(b.level)
    assert np.all(level == level[:1])
    groups = level[0].reshape(2, GROUP)
    assert np.all(groups == groups[:, :1])
    np.testing.assert_array_equal(np.argmax(obs[0], -1), level[0])
    assert np.all(np.diff(np.asarray(b.score), axis=0) >= 0)


def test_monte_carlo_return_matches_exact_objective(batches):
    returns = np.sum(np.asarray(batches.rewards * batches.mask), axis=1).ravel()
    j = float(enumerable.exact_objective(PARAMS))
    se = returns.std() / np.sqrt(returns.size)
    assert abs(returns.mean() - j) < Z * se


# ----------------------------------------------------------------- unbiasedness

UNBIASED = [
    "reinforce",
    "reward_to_go",
    "constant_baseline",
    "rloo/batch",
    "rloo/group",
    "optimal/scalar",
    "optimal/per_parameter",
    "optimal/group",
    "value_baseline",
    "gae/lambda_1",
    "ppo/ratio_1",
]
SHRUNK = {
    # Mean baseline including the sample itself: (n - 1) / n of the true gradient.
    "mean/batch": (BATCH - 1) / BATCH,
    "mean/group": (GROUP - 1) / GROUP,
    # Dr. GRPO at ratio 1: the same group-mean shrink, and the constant 1 / T.
    "dr_grpo/group": (GROUP - 1) / GROUP / HORIZON,
}


@pytest.mark.slow
@pytest.mark.parametrize("config", UNBIASED)
def test_unbiased_estimators_match_exact_gradient(estimates, exact, config):
    z = _z_scores(estimates[config], exact)
    assert np.all(np.abs(z) < Z), z


@pytest.mark.slow
@pytest.mark.parametrize("config", list(SHRUNK))
def test_shrunk_estimators_match_scaled_exact_gradient(estimates, exact, config):
    samples = estimates[config]
    assert np.all(np.abs(_z_scores(samples, SHRUNK[config] * exact)) < Z)
    # ... and the shrink is detectable: the unscaled gradient is rejected.
    assert np.any(np.abs(_z_scores(samples, exact)) > Z)


@pytest.mark.slow
def test_optimal_baseline_without_leave_one_out_is_biased(estimates, exact):
    samples = estimates["optimal/no_leave_one_out"]
    assert np.any(np.abs(_z_scores(samples, exact)) > Z)


@pytest.mark.slow
def test_grpo_std_normalisation_biases_the_direction(estimates, exact):
    # Control: unbiased and shrunk estimators pass the same direction test ...
    for config in ["rloo/group", "mean/group", "dr_grpo/group"]:
        assert _scale_fit_chi2(estimates[config], exact) < 30.0, config
    # ... GRPO's mean is not parallel to the true gradient, whether it normalises
    # within groups of one level or over the whole batch.
    for config in ["grpo/group", "grpo/batch"]:
        assert _scale_fit_chi2(estimates[config], exact) > 30.0, config


# ------------------------------------------------------- identities on one batch

MOVED = {**PARAMS, "logits": PARAMS["logits"] + jnp.array([[1.0, -1.0]] * 3)}
OTHER = {**PARAMS, "logits": -PARAMS["logits"]}
RATIO_KWARGS = {"gamma": 0.9, "lam": 0.8, "vf_coef": 0.5, "ent_coef": 0.01}


def _small_configs():
    """key -> (loss, params) evaluated on the small batch."""
    configs = {
        "reinforce": (_loss("reinforce"), PARAMS),
        "rloo": (_loss("rloo"), PARAMS),
        "mean_baseline": (_loss("mean_baseline"), PARAMS),
        "grpo": (_loss("grpo"), PARAMS),
        "dr_grpo": (_loss("dr_grpo"), PARAMS),
        "grpo/kl_same": (_loss("grpo", beta=0.1, ref_params=PARAMS), PARAMS),
        "dr_grpo/kl_other": (_loss("dr_grpo", beta=0.1, ref_params=OTHER), PARAMS),
    }
    for variant in ["scalar", "per_parameter"]:
        for loo in [True, False]:
            loss = _loss("optimal_baseline", variant=variant, leave_one_out=loo)
            configs[f"optimal/{variant}/{loo}"] = (loss, PARAMS)
    ppo = _loss("ppo_clip", normalize_advantages=False, **RATIO_KWARGS)
    gae = _loss("gae", **RATIO_KWARGS)
    for label, params in [("behaviour", PARAMS), ("moved", MOVED)]:
        configs[f"ppo/{label}"] = (ppo, params)
        configs[f"gae/{label}"] = (gae, params)
    for name in ["value_baseline", "gae", "ppo_clip"]:
        for vf_coef in [0.0, 0.5]:
            configs[f"{name}/vf_{vf_coef}"] = (_loss(name, vf_coef=vf_coef), PARAMS)
    return configs


@pytest.fixture(scope="module")
def small_results_fn():
    fns = {
        key: functools.partial(_value_and_grad, loss, params)
        for key, (loss, params) in _small_configs().items()
    }
    return _jit_all(fns)


@pytest.fixture(scope="module")
def small(small_results_fn, small_batch):
    """key -> ((loss, aux), grad) on the small batch."""
    return small_results_fn(small_batch)


def _assert_trees_close(a, b, **kw):
    kw = {"atol": 1e-6, **kw}
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def _manual_scores(batch: Trajectory, params) -> np.ndarray:
    """[B, S, A] per-trajectory scores grad_logits log p(tau_i), by the softmax rule
    d log pi(a|s) / d logits[s', a'] = 1[s = s'] (1[a = a'] - pi(a'|s))."""
    pi = np.asarray(jax.nn.softmax(params["logits"]))
    states = np.argmax(np.asarray(batch.observations), axis=-1)
    actions, mask = np.asarray(batch.actions), np.asarray(batch.mask)
    scores = np.zeros((mask.shape[1], *pi.shape))
    for t, i in zip(*np.nonzero(mask), strict=True):
        s, a = states[t, i], actions[t, i]
        scores[i, s] += np.eye(pi.shape[1])[a] - pi[s]
    return scores


def _episode_returns(batch):
    return np.sum(np.asarray(batch.rewards) * np.asarray(batch.mask), axis=0)


@pytest.mark.slow
def test_sampling_and_estimates_are_deterministic_per_key(small_results_fn):
    a = _sample_small(jax.random.PRNGKey(5), PARAMS)
    # The same key through another compilation (n and the group size static
    # arguments instead of bound) gives the same batch, bit for bit.
    sample = jax.jit(enumerable.sample_batch, static_argnames=("n", "group_size"))
    b = sample(jax.random.PRNGKey(5), PARAMS, n=BATCH, group_size=GROUP)
    c = _sample_small(jax.random.PRNGKey(6), PARAMS)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert np.any(np.asarray(a.actions) != np.asarray(c.actions))
    results_a, results_b = small_results_fn(a), small_results_fn(b)
    jax.tree.map(np.testing.assert_array_equal, results_a, results_b)
    # ... and a different key gives different estimates (no constant output).
    results_c = small_results_fn(c)
    for key, ((loss_a, _), grad_a) in results_a.items():
        (loss_c, _), grad_c = results_c[key]
        assert not np.array_equal(grad_a["logits"], grad_c["logits"]), key
        assert loss_a != loss_c, key


def test_reinforce_is_the_seed_surrogate(small, small_batch):
    b = small_batch
    (loss, aux), grad = small["reinforce"]
    # Loss = -(1/n) sum_i sum_t m log pi(a_t|s_t) R(tau_i)
    log_pi = jax.nn.log_softmax(PARAMS["logits"])
    states = np.argmax(np.asarray(b.observations), axis=-1)
    log_probs = np.asarray(log_pi)[states, np.asarray(b.actions)] * np.asarray(b.mask)
    returns = _episode_returns(b)
    np.testing.assert_allclose(loss, -np.mean(log_probs.sum(0) * returns), rtol=1e-5)
    np.testing.assert_allclose(aux.pg_loss, loss)
    # Gradient: -(1/n) sum_i s_i R_i with hand-computed scores.
    expected = -np.einsum("i,isa->sa", returns, _manual_scores(b, PARAMS)) / 8
    np.testing.assert_allclose(grad["logits"], expected, atol=1e-5)
    np.testing.assert_array_equal(grad["value"], 0.0)


def test_rloo_is_rescaled_mean_baseline(small):
    # R_i - b_i = G / (G - 1) (R_i - mean) within each group.
    rloo, mean = small["rloo"][1], small["mean_baseline"][1]
    _assert_trees_close(rloo, jax.tree.map(lambda x: x * GROUP / (GROUP - 1), mean))


@pytest.mark.parametrize("variant", ["scalar", "per_parameter"])
@pytest.mark.parametrize("leave_one_out", [True, False])
def test_optimal_baseline_by_hand(small, small_batch, variant, leave_one_out):
    s = _manual_scores(small_batch, PARAMS).reshape(8, -1)  # [B, P]
    r = _episode_returns(small_batch)
    # Weights: ||s_i||^2 (scalar form) or s_ik^2 (per parameter).
    w = np.sum(s**2, axis=1, keepdims=True) if variant == "scalar" else s**2
    w = np.broadcast_to(w, s.shape)
    wr = w * r[:, None]
    if leave_one_out:  # sums over the other 7 trajectories of the batch
        num, den = wr.sum(0) - wr, w.sum(0) - w
    else:
        num = np.broadcast_to(wr.sum(0), s.shape)
        den = np.broadcast_to(w.sum(0), s.shape)
    baseline = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    # -(1/B) sum_i s_i (R_i - b_i)
    expected = -np.mean(s * (r[:, None] - baseline), axis=0).reshape(3, 2)
    grad = small[f"optimal/{variant}/{leave_one_out}"][1]
    np.testing.assert_allclose(grad["logits"], expected, atol=1e-5)


def test_grpo_at_ratio_one_is_length_normalised_reinforce(small, small_batch):
    b = small_batch
    r = _episode_returns(b).reshape(2, GROUP)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    lengths = np.asarray(b.mask).sum(0)
    # -(1/B) sum_i A_i / |o_i| grad log p(tau_i)
    expected = -np.einsum("i,isa->sa", adv.ravel() / lengths, _manual_scores(b, PARAMS))
    np.testing.assert_allclose(small["grpo"][1]["logits"], expected / 8, atol=1e-5)
    # Dr. GRPO: the mean baseline estimate divided by the constant T.
    dr, mean = small["dr_grpo"][1], small["mean_baseline"][1]
    _assert_trees_close(dr, jax.tree.map(lambda x: x / HORIZON, mean))


def test_ppo_at_ratio_one_equals_gae(small):
    _assert_trees_close(small["ppo/behaviour"][1], small["gae/behaviour"][1])
    # Away from the behaviour policy the ratio (and the clip) change the gradient.
    (_, aux), g_ppo = small["ppo/moved"]
    g_gae = small["gae/moved"][1]
    assert not np.allclose(g_ppo["logits"], g_gae["logits"], atol=1e-3)
    assert aux.clip_fraction > 0 and aux.approx_kl > 0


@pytest.mark.parametrize("name", ["value_baseline", "gae", "ppo_clip"])
def test_value_loss_trains_only_the_critic_part(small, small_batch, name):
    without = small[f"{name}/vf_0.0"][1]
    (_, aux), with_vf = small[f"{name}/vf_0.5"]
    np.testing.assert_array_equal(without["value"], 0.0)  # stop_gradient on V
    assert np.all(np.isfinite(with_vf["value"])) and np.any(with_vf["value"] != 0)
    np.testing.assert_allclose(with_vf["logits"], without["logits"], atol=1e-6)
    if name == "value_baseline":
        # value_loss = (1/B) sum m 0.5 (V(s_t) - G_t)^2 with G the reward-to-go.
        mask, rewards = np.asarray(small_batch.mask), np.asarray(small_batch.rewards)
        to_go = np.cumsum((rewards * mask)[::-1], axis=0)[::-1]
        v = np.asarray(small_batch.values)
        expected = np.sum(mask * 0.5 * (v - to_go) ** 2) / 8
        np.testing.assert_allclose(aux.value_loss, expected, rtol=1e-5)


def test_grpo_kl_to_reference(small, small_batch):
    with pytest.raises(ValueError, match="ref_params"):
        jax.eval_shape(_loss("grpo", beta=0.1), PARAMS, small_batch)
    # k3 at pi_ref = pi: value 0 and gradient 0.
    (_, aux), grad = small["grpo/kl_same"]
    assert aux.kl == 0.0
    _assert_trees_close(grad, small["grpo"][1], atol=1e-7)
    (_, aux), _ = small["dr_grpo/kl_other"]
    assert aux.kl > 0


# ---------------------------------------------------------- masks and edge cases


def _with_garbage_padding(batch: Trajectory, seed: int) -> Trajectory:
    """Every field replaced by garbage where mask == 0 (NaN floats, random ints)."""
    rng = np.random.default_rng(seed)
    pad = np.asarray(batch.mask) == 0

    def corrupt(x):
        x = np.asarray(x)
        where = pad.reshape(pad.shape + (1,) * (x.ndim - 2))
        if x.dtype == bool:
            garbage = rng.random(x.shape) < 0.5
        elif np.issubdtype(x.dtype, np.integer):
            garbage = rng.integers(-5, 50, size=x.shape)
        else:
            garbage = np.full(x.shape, np.nan)
        return jnp.asarray(np.where(where, garbage, x).astype(x.dtype))

    fields = {k: corrupt(v) for k, v in batch._asdict().items() if k != "mask"}
    return Trajectory(mask=batch.mask, **fields)


def _synthetic_batch(mask: np.ndarray, rewards: np.ndarray) -> Trajectory:
    """A [T, B] tabular batch with the given mask and rewards, ratios 1 at PARAMS."""
    num_steps, num_columns = mask.shape
    rng = np.random.default_rng(0)
    obs = jax.nn.one_hot(rng.integers(0, 3, size=mask.shape), 3)
    actions = jnp.asarray(rng.integers(0, 2, size=mask.shape), jnp.int32)
    logits, values = POLICY.apply(PARAMS, obs)
    lengths = mask.sum(0).astype(int)
    terminated = np.zeros(mask.shape, bool)
    for i, n in enumerate(lengths):
        if n:
            terminated[n - 1, i] = True
    return Trajectory(
        observations=obs,
        actions=actions,
        rewards=jnp.asarray(rewards * mask, jnp.float32),
        log_probs=policies.log_prob(logits, actions),
        values=values,
        next_values=values,
        terminated=jnp.asarray(terminated),
        truncated=jnp.zeros(mask.shape, bool),
        mask=jnp.asarray(mask, jnp.float32),
        level=jnp.zeros(mask.shape, jnp.int32),
        score=jnp.zeros(mask.shape, jnp.int32),
    )


EDGE_CASES = {
    # Every return equal (group std 0): full-length episodes, reward 1 per step.
    "equal_returns": (np.ones((4, 8)), np.ones((4, 8))),
    # T = 1: every episode has length one.
    "one_step": (np.ones((1, 8)), np.arange(8.0)[None]),
    # Episodes of length 1 in a longer batch, and columns with no live step at all.
    "empty_columns": (
        np.array([[1, 1, 0, 1, 0, 1, 1, 1]] + [[1, 0, 0, 1, 0, 0, 1, 0]] * 3, float),
        np.arange(32.0).reshape(4, 8),
    ),
    # Nothing live anywhere.
    "all_masked": (np.zeros((4, 8)), np.ones((4, 8))),
}


@pytest.fixture(scope="module")
def edge_results(small_batch):
    """name -> (results on a stack of [4, 8] batches, results on the T = 1 batch).

    The stack: the sampled batch, the same batch with garbage padding, and the edge
    cases of that shape. Every estimator runs under one jit (and vmap over the stack).
    """
    edge_names = ["equal_returns", "empty_columns", "all_masked"]
    cases = [small_batch, _with_garbage_padding(small_batch, seed=1)]
    cases += [_synthetic_batch(*EDGE_CASES[c]) for c in edge_names]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *cases)
    one_step = _synthetic_batch(*EDGE_CASES["one_step"])
    fns = {}
    for name in estimators.ESTIMATORS:
        value_and_grad = functools.partial(_value_and_grad, _loss(name), PARAMS)
        fns[name, "stack"] = lambda stack, _, f=value_and_grad: jax.vmap(f)(stack)
        fns[name, "one_step"] = lambda _, one_step, f=value_and_grad: f(one_step)
    out = _jit_all(fns)(stacked, one_step)
    return {
        name: (out[name, "stack"], out[name, "one_step"])
        for name in estimators.ESTIMATORS
    }


@pytest.mark.parametrize("name", list(estimators.ESTIMATORS))
@pytest.mark.slow
def test_padding_edge_cases_and_transformations(edge_results, name):
    mapped, out_one_step = edge_results[name]

    def case(i):
        return jax.tree.map(lambda x: x[i], mapped)

    (value, aux), grad = case(0)
    assert value.shape == () and value.dtype == jnp.float32
    assert isinstance(aux, estimators.LossAux) and all(x.shape == () for x in aux)
    assert any(np.any(g != 0) for g in jax.tree.leaves(grad))
    # Garbage (NaN floats, random ints and flags) under mask 0 changes nothing.
    _assert_trees_close(case(1), case(0), rtol=1e-5)
    # No NaN or inf: equal returns in a group, length-1 episodes, empty columns,
    # nothing live at all, T = 1.
    for leaf in jax.tree.leaves((mapped, out_one_step)):
        assert np.all(np.isfinite(leaf))
    # Nothing live, no gradient.
    assert all(np.all(g == 0) for g in jax.tree.leaves(case(4)[1]))


# ------------------------------------------------------------------ registry and API


def test_registry_api_conformance():
    assert set(estimators.ESTIMATORS) == set(DEFAULT_KWARGS)
    for name, fn in estimators.ESTIMATORS.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["params", "batch"]
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:2])
        assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])
        assert "apply_fn" in estimators.hyperparameters(name)
        assert fn.__doc__ and "Returns:" in fn.__doc__


def test_get_estimator_rejects_bad_input(small_batch):
    with pytest.raises(ValueError, match="known estimators: reinforce"):
        estimators.get_estimator("reinforce_plus")
    with pytest.raises(ValueError, match="accepts apply_fn, gamma, lam"):
        estimators.get_estimator("gae", gamma=0.9, clip_eps=0.1)
    bad_values = [
        ("gae", {"gamma": 1.5}),
        ("ppo_clip", {"clip_eps": 0.0}),
        ("rloo", {"group_size": 1}),
        ("grpo", {"group_size": 2.5}),
        ("grpo", {"group_size": 1}),  # min_group_size 2: a gradient of 0
        ("gspo", {"group_size": 1}),
        ("mean_baseline", {"group_size": 1}),  # R - R: a gradient of 0
        ("dr_grpo", {"group_size": 1}),
        ("optimal_baseline", {"variant": "diagonal"}),
        ("ppo_clip", {"normalize_advantages": 1}),
        ("value_baseline", {"vf_coef": -1.0}),
        ("constant_baseline", {"b": float("nan")}),
        ("reinforce", {"apply_fn": 3}),
    ]
    for name, kwargs in bad_values:
        with pytest.raises(ValueError, match=f"Invalid {next(iter(kwargs))}="):
            estimators.get_estimator(name, **kwargs)
    # Groups of 1 without leave-one-out: each return its own baseline (with it,
    # b = 0: plain REINFORCE, allowed); caught when the loss sees the batch.
    with pytest.raises(ValueError, match="leave_one_out=False needs group_size >= 2"):
        jax.eval_shape(
            _loss("optimal_baseline", group_size=1, leave_one_out=False),
            PARAMS,
            small_batch,
        )
    jax.eval_shape(_loss("optimal_baseline", group_size=1), PARAMS, small_batch)
    # A group size that does not divide B is caught when the loss sees the batch.
    with pytest.raises(ValueError, match="must divide"):
        jax.eval_shape(_loss("rloo", group_size=3), PARAMS, small_batch)
    # Bound values can still be overridden by keyword at call time.
    loss = estimators.get_estimator("constant_baseline", apply_fn=POLICY.apply)
    assert isinstance(loss, functools.partial)
    assert loss.func is estimators.constant_baseline
    assert loss.keywords == {"apply_fn": POLICY.apply}


@pytest.mark.slow
def test_estimators_with_an_mlp_policy():
    policy = policies.mlp_policy(2, hidden=(8,), value="shared")
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(size=(5, 6, 4)), jnp.float32)
    params = jax.jit(policy.init)(jax.random.PRNGKey(0), obs[0, 0])
    mask = np.ones((5, 6))
    mask[3:, :2] = 0
    terminated = np.zeros((5, 6), bool)
    terminated[2, :2] = True
    truncated = np.zeros((5, 6), bool)
    truncated[-1, 2:] = True
    batch = Trajectory(
        observations=obs,
        actions=jnp.asarray(rng.integers(0, 2, size=(5, 6)), jnp.int32),
        rewards=jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
        log_probs=jnp.full((5, 6), np.log(0.5), jnp.float32),
        values=jnp.zeros((5, 6)),
        next_values=jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
        terminated=jnp.asarray(terminated),
        truncated=jnp.asarray(truncated),
        mask=jnp.asarray(mask, jnp.float32),
        level=jnp.zeros((5, 6), jnp.int32),
        score=jnp.zeros((5, 6), jnp.int32),
    )
    losses = [
        estimators.get_estimator(name, apply_fn=policy.apply, **kwargs)
        for name, kwargs in [
            ("optimal_baseline", {"variant": "per_parameter"}),
            ("ppo_clip", {}),
        ]
    ]

    @jax.jit
    def all_grads(params, batch):
        return [jax.grad(lambda p, f=f: f(p, batch)[0])(params) for f in losses]

    optimal, ppo = (jax.tree.leaves(g) for g in all_grads(params, batch))
    assert all(np.all(np.isfinite(g)) for g in optimal + ppo)
    assert any(np.any(g != 0) for g in optimal)
    assert all(np.any(g != 0) for g in ppo)  # every layer, the critic included


# ------------------------------------------------------------------- end to end


def test_rloo_gradient_ascent_improves_the_exact_objective():
    loss = _loss("rloo", group_size=GROUP)
    start = {**PARAMS, "logits": jnp.zeros((3, 2))}

    def step(params, key):
        batch = enumerable.sample_batch(key, params, 32, group_size=GROUP)
        grads = _value_and_grad(loss, params, batch)[1]
        return jax.tree.map(lambda p, g: p - 1.0 * g, params, grads), None

    def exact_step(params, _):
        grads = enumerable.exact_gradient(params)
        return jax.tree.map(lambda p, g: p + 1.0 * g, params, grads), None

    @jax.jit
    def objectives(start):
        keys = jax.random.split(jax.random.PRNGKey(7), 100)
        final, _ = jax.lax.scan(step, start, keys)
        # Exact gradient ascent with the same step size and number of steps.
        reference, _ = jax.lax.scan(exact_step, start, None, length=100)
        return [enumerable.exact_objective(p) for p in (start, final, reference)]

    j0, j1, j_ref = (float(j) for j in objectives(start))
    assert j1 > j0 + 0.5 * (j_ref - j0), (j0, j1, j_ref)


def _uniform_batch(num_steps, num_columns, lengths):
    """[T, B] batch of a 2-action uniform policy (H = log 2 per step); column b is
    live for ``lengths[b]`` steps."""
    mask = (jnp.arange(num_steps)[:, None] < jnp.asarray(lengths)[None, :]).astype(
        jnp.float32
    )
    zeros = jnp.zeros((num_steps, num_columns))
    return Trajectory(
        observations=jnp.ones((num_steps, num_columns, 3)) / 3,
        actions=zeros.astype(jnp.int32),
        rewards=jnp.arange(num_steps * num_columns, dtype=jnp.float32).reshape(
            num_steps, num_columns
        )
        % 3,
        log_probs=zeros + jnp.log(0.5),
        values=zeros,
        next_values=zeros,
        terminated=mask.astype(bool) & (jnp.cumsum(mask, 0) == mask.sum(0)),
        truncated=zeros.astype(bool),
        mask=mask,
        level=zeros.astype(jnp.int32),
        score=zeros.astype(jnp.int32),
    )


def _entropy_weight(name, batch, **kwargs):
    """d loss / d ent_coef (the loss is linear in ent_coef)."""
    params = {"logits": jnp.zeros((3, 2)), "value": jnp.zeros(3)}

    def loss(c):
        fn = estimators.get_estimator(name, apply_fn=POLICY.apply, **kwargs)
        return fn(params, batch, ent_coef=c)[0]

    return float(jax.grad(loss)(0.0))


@pytest.mark.slow
def test_group_relative_entropy_is_aggregated_like_the_policy_term():
    T, lengths = 16, [16, 16, 8, 4]
    batch = _uniform_batch(T, 4, lengths)
    h = np.log(2.0)
    # GRPO: (1/B) sum_i (1/|o_i|) sum_t m H = mean token entropy = log 2
    assert _entropy_weight("grpo", batch, group_size=4) == pytest.approx(-h, rel=1e-5)
    # Dr. GRPO: (1/(B T)) sum_i sum_t m H
    expected = -h * sum(lengths) / (4 * T)
    assert _entropy_weight("dr_grpo", batch, group_size=4) == pytest.approx(
        expected, rel=1e-5
    )
    # PPO's as training uses it (loss / steps per column): log 2 on all-live batches
    full = _uniform_batch(T, 4, [T] * 4)
    from rl_pg.algos import loop

    params = {"logits": jnp.zeros((3, 2)), "value": jnp.zeros(3)}
    ppo = jax.grad(
        lambda c: loop.make_loss("ppo_clip", POLICY.apply, T, ent_coef=c)(params, full)[
            0
        ]
    )
    grpo = jax.grad(
        lambda c: loop.make_loss("grpo", POLICY.apply, T, group_size=4, ent_coef=c)(
            params, full
        )[0]
    )
    assert float(grpo(0.0)) == pytest.approx(float(ppo(0.0)), rel=1e-5)
    assert float(ppo(0.0)) == pytest.approx(-h, rel=1e-5)


# -------------------------------------------------------------- per-step weights

# The variance study's hyperparameters: value, entropy and KL terms off.
WEIGHT_KWARGS = {
    "group_size": GROUP,
    "vf_coef": 0.0,
    "ent_coef": 0.0,
    "beta": 0.0,
    "b": 1.5,
    "gamma": 0.9,
    "lam": 0.8,
}
WEIGHT_CASES = [
    (name, {})
    for name, s in estimators.REGISTRY.items()
    if s.weights is not None or s.from_scores is not None
] + [
    ("optimal_baseline", {"group_size": None}),
    ("optimal_baseline", {"leave_one_out": False}),
    ("optimal_baseline_per_parameter", {"group_size": None}),
    ("ppo_clip", {"normalize_advantages": False}),
    ("grpo", {"group_size": None}),
]
MLP = policies.mlp_policy(2, hidden=(8,), value="separate")


def _on_policy_mlp_batch(num_columns: int, seed: int):
    """An MLP policy's params and a [5, num_columns] batch with padding, early
    terminations and truncations whose log_probs and values are the policy's own
    (the on-policy point: every ratio is 1)."""
    rng = np.random.default_rng(seed)
    T = 5
    obs = jnp.asarray(rng.normal(size=(T, num_columns, 4)), jnp.float32)
    params = MLP.init(jax.random.PRNGKey(seed), obs[0, 0])
    actions = jnp.asarray(rng.integers(0, 2, size=(T, num_columns)), jnp.int32)
    lengths = rng.integers(1, T + 1, size=num_columns)
    mask = (np.arange(T)[:, None] < lengths[None]).astype(np.float32)
    terminated = np.arange(T)[:, None] == lengths[None] - 1
    terminated &= (lengths < T)[None]
    truncated = (np.arange(T)[:, None] == T - 1) & (lengths == T)[None]
    logits, values = MLP.apply(params, obs)
    batch = Trajectory(
        observations=obs,
        actions=actions,
        rewards=jnp.asarray(rng.normal(size=(T, num_columns)), jnp.float32),
        log_probs=policies.log_prob(logits, actions),
        values=values,
        next_values=jnp.asarray(rng.normal(size=(T, num_columns)), jnp.float32),
        terminated=jnp.asarray(terminated),
        truncated=jnp.asarray(truncated),
        mask=jnp.asarray(mask),
        level=jnp.zeros((T, num_columns), jnp.int32),
        score=jnp.zeros((T, num_columns), jnp.int32),
    )
    return params, batch


def _weight_kwargs(name: str, extra: dict) -> dict:
    accepted = estimators.hyperparameters(name)
    return {k: v for k, v in WEIGHT_KWARGS.items() if k in accepted} | extra


def _fast_and_loss_gradients(name, kwargs, params, batch, apply_fn, weights=None):
    """(the estimate from the declared weights, -grad of the registered loss)."""
    spec = estimators.spec(name)
    loss = estimators.get_estimator(name, apply_fn=apply_fn, **kwargs)
    by_loss = jax.grad(lambda p: loss(p, batch)[0])(params)
    if weights is None and spec.weights is None:
        scores = estimators.trajectory_scores(params, batch, apply_fn)
        fast = spec.from_scores(batch, scores, **kwargs)
    else:
        weights = weights or estimators.get_weights(name, **kwargs)
        step_weights = weights(batch, estimators.weight_inputs(params, batch, apply_fn))
        fast = ravel_pytree(
            estimators.weighted_gradient(params, batch, step_weights, apply_fn)
        )[0]
    return np.asarray(fast), -np.asarray(ravel_pytree(by_loss)[0])


def _assert_close(fast, by_loss):
    scale = np.abs(by_loss).max()
    assert scale > 0
    np.testing.assert_allclose(fast, by_loss, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name, extra", WEIGHT_CASES)
@pytest.mark.parametrize("num_columns", [4, 12])
@pytest.mark.slow
def test_weights_give_the_loss_gradient_at_the_on_policy_point(
    name, extra, num_columns
):
    params, batch = _on_policy_mlp_batch(num_columns, seed=num_columns)
    kwargs = _weight_kwargs(name, extra)
    _assert_close(*_fast_and_loss_gradients(name, kwargs, params, batch, MLP.apply))


@pytest.mark.parametrize("name, extra", WEIGHT_CASES)
@pytest.mark.slow
def test_weights_on_the_enumerable_mdp(name, extra, small_batch):
    kwargs = _weight_kwargs(name, extra)
    _assert_close(
        *_fast_and_loss_gradients(name, kwargs, PARAMS, small_batch, POLICY.apply)
    )


def _off_by(fn, factor):
    """fn's weights with the first column's coefficients scaled by ``factor``."""

    def weights(batch, inputs):
        step = fn(batch, inputs)
        return step._replace(
            coefficients={
                k: c.at[0].multiply(factor) for k, c in step.coefficients.items()
            }
        )

    return weights


BROKEN_WEIGHTS = {
    "rloo with the mean baseline's weights": (
        "rloo",
        functools.partial(estimators.mean_baseline_weights, group_size=GROUP),
    ),
    "ppo_clip without normalisation": (
        "ppo_clip",
        functools.partial(
            estimators.ppo_clip_weights,
            gamma=0.9,
            lam=0.8,
            vf_coef=0.0,
            ent_coef=0.0,
            normalize_advantages=False,
        ),
    ),
    "grpo without the length normalisation": (
        "grpo",
        functools.partial(estimators.dr_grpo_weights, group_size=GROUP),
    ),
    "one column of reward_to_go off by 1%": (
        "reward_to_go",
        _off_by(estimators.reward_to_go_weights, 1.01),
    ),
    "one column of the optimal baseline off by 1%": (
        "optimal_baseline",
        _off_by(
            functools.partial(estimators.optimal_baseline_weights, group_size=GROUP),
            1.01,
        ),
    ),
}


@pytest.mark.parametrize("case", BROKEN_WEIGHTS)
@pytest.mark.slow
def test_a_wrong_weight_is_caught(case):
    name, weights = BROKEN_WEIGHTS[case]
    params, batch = _on_policy_mlp_batch(8, seed=8)
    kwargs = _weight_kwargs(name, {})
    fast, by_loss = _fast_and_loss_gradients(
        name, kwargs, params, batch, MLP.apply, weights=weights
    )
    with pytest.raises(AssertionError):
        _assert_close(fast, by_loss)


def test_weights_refuse_value_entropy_and_kl_terms(small_batch):
    inputs = estimators.weight_inputs(PARAMS, small_batch, POLICY.apply)
    for name, kwargs in [
        ("value_baseline", {}),  # vf_coef = 0.5 by default
        ("gae", {"vf_coef": 0.0, "ent_coef": 0.1}),
        ("ppo_clip", {"vf_coef": 0.0}),  # ent_coef = 0.01 by default
        ("grpo", {"beta": 0.1, "group_size": GROUP}),
        ("optimal_baseline", {"variant": "per_parameter"}),
    ]:
        with pytest.raises(ValueError, match="weight|scores"):
            estimators.get_weights(name, **kwargs)(small_batch, inputs)


def test_weights_match_their_loss_signature():
    for s in estimators.REGISTRY.values():
        for fn in (s.weights, s.from_scores):
            if fn is None:
                continue
            loss_kw = inspect.signature(s.loss).parameters
            for p in inspect.signature(fn).parameters.values():
                if p.kind is p.KEYWORD_ONLY:
                    assert loss_kw[p.name].default == p.default, (s.name, p.name)

    def bad_weights(batch, inputs, *, other=1.0):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="same defaults"):
        estimators.register(
            estimators.EstimatorSpec(
                "a_bad_weighting", estimators.reinforce, weights=bad_weights
            )
        )
    assert "a_bad_weighting" not in estimators.REGISTRY
    with pytest.raises(ValueError, match="no per-step weights"):
        estimators.get_weights("optimal_baseline_per_parameter")


@pytest.mark.parametrize("size,group", [(1024, None), (100, None), (64, 16), (9, None)])
def test_group_sum_others_matches_brute_force(size, group):
    x = np.random.default_rng(size).normal(size=(size, 3)).astype(np.float32)
    got = np.asarray(estimators._group_sum_others(jnp.asarray(x.T), group)).T
    g = size if group is None else group
    xg = x.reshape(-1, g, 3).astype(np.float64)
    want = (xg.sum(1, keepdims=True) - xg).reshape(size, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4)  # float32 sums


def test_group_sum_others_does_not_cancel():
    """The member with a huge value gets the others' sum exactly (no total - x_i)."""
    x = jnp.concatenate([jnp.array([1e8]), jnp.arange(1.0, 20.0)])
    for group in (None, 20):
        assert float(estimators._group_sum_others(x, group)[0]) == 190.0


@pytest.mark.slow
def test_optimal_baselines_are_exactly_zero_when_every_return_is_equal():
    """Returns all 25.7 (not a power of two): b_{-i} = R exactly, so both optimal
    baselines' estimates are exactly 0 (their value), not rounding noise; returns
    that differ give a non-zero estimate."""
    rng = np.random.default_rng(0)
    B, P = 16, 7
    scores = jnp.asarray(rng.normal(size=(B, P)) * 10.0 ** rng.integers(-3, 3, (B, 1)))
    rewards = jnp.zeros((2, B)).at[0].set(25.7)
    batch = Trajectory(
        observations=jnp.zeros((2, B, 1)),
        actions=jnp.zeros((2, B), jnp.int32),
        rewards=rewards,
        terminated=jnp.zeros((2, B), bool).at[1].set(True),
        truncated=jnp.zeros((2, B), bool),
        log_probs=jnp.zeros((2, B)),
        values=jnp.zeros((2, B)),
        next_values=jnp.zeros((2, B)),
        mask=jnp.ones((2, B)),
        level=jnp.zeros((2, B), jnp.int32),
        score=jnp.zeros((2, B), jnp.int32),
    )
    per_parameter = estimators.optimal_baseline_per_parameter_from_scores
    norms = jnp.sum(jnp.square(scores), -1)
    for group_size in (None, 4):
        est = per_parameter(batch, scores, group_size=group_size)
        assert np.all(np.asarray(est) == 0.0), group_size
        b = estimators._weighted_return_baseline(
            jnp.full(B, 25.7), norms, leave_one_out=True, group_size=group_size
        )
        assert np.all(np.asarray(b) == np.float32(25.7)), group_size
    varied = batch._replace(rewards=rewards.at[0, 3].set(30.0))
    assert np.any(np.asarray(per_parameter(varied, scores)) != 0.0)


def test_a_per_step_field_of_another_shape_is_refused(small_batch):
    """Every [T, B] field has the actions' shape: behaviour log-probs of one
    column ([T, 1]) would silently broadcast over the batch's ratios."""
    loss = _loss("ppo_clip")
    jax.eval_shape(loss, PARAMS, small_batch)
    for field in ("log_probs", "values", "next_values", "truncated"):
        bad = small_batch._replace(**{field: getattr(small_batch, field)[:, :1]})
        with pytest.raises(AssertionError, match="shape"):
            jax.eval_shape(loss, PARAMS, bad)
    for empty in (small_batch.mask[:, :0].shape, small_batch.mask[:0].shape):
        cut = jax.tree.map(lambda x, e=empty: x[: e[0], : e[1]], small_batch)
        with pytest.raises(ValueError, match="needs a batch"):
            jax.eval_shape(_loss("reinforce"), PARAMS, cut)
