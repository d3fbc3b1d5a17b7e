"""Independent checks of the estimators built from per-step weights, on-policy and
off-policy: hand-computed values on padded batches, rlax as the oracle (GAE, PPO's
clipped objective, V-trace), analytic identities, hand-written objectives whose
``jax.grad`` the ratio-aware weights must give, and exact expectations under a
behaviour policy by enumerating every trajectory of a tiny MDP (written here)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rl_pg import enumerable, estimators, policies
from rl_pg.trajectory import Trajectory

POLICY = enumerable.tabular_policy(2, 2)
MU = {"logits": jnp.array([[0.2, -0.3], [0.4, 0.1]]), "value": jnp.array([0.5, -1.0])}
THETA = {"logits": jnp.array([[0.9, -0.6], [-0.3, 0.5]]), "value": MU["value"]}
HORIZON = 3


def _step(state: int, action: int) -> tuple[int, float, bool]:
    """Tiny MDP: the action is the next state; reward 1 + s - 2 a s; (1, 1) ends."""
    return action, 1.0 + state - 2.0 * action * state, state == 1 and action == 1


def _all_episodes():
    """Every episode from s_0 = 0: (states, actions, rewards), lengths 2 or 3."""
    episodes = []
    for actions in itertools.product(range(2), repeat=HORIZON):
        states, rewards, state = [], [], 0
        for a in actions:
            states.append(state)
            state, r, done = _step(state, a)
            rewards.append(r)
            if done:
                break
        episode = (tuple(states), actions[: len(states)], tuple(rewards))
        if episode not in episodes:
            episodes.append(episode)
    return episodes


def _batch(episodes, params) -> Trajectory:
    """[H, N] episodic batch with the behaviour log-probs and values of ``params``."""
    n = len(episodes)
    mask = np.zeros((HORIZON, n), np.float32)
    states, actions = np.zeros((HORIZON, n), int), np.zeros((HORIZON, n), int)
    rewards = np.zeros((HORIZON, n), np.float32)
    terminated = np.zeros((HORIZON, n), bool)
    for i, (s, a, r) in enumerate(episodes):
        k = len(s)
        mask[:k, i], states[:k, i], actions[:k, i], rewards[:k, i] = 1, s, a, r
        terminated[k - 1, i] = True
    obs = jax.nn.one_hot(states, 2) * mask[..., None]
    logits, values = POLICY.apply(params, obs)
    actions = jnp.asarray(actions, jnp.int32)
    return Trajectory(
        observations=obs,
        actions=actions,
        rewards=jnp.asarray(rewards),
        log_probs=policies.log_prob(logits, actions) * mask,
        values=values * mask,
        next_values=jnp.zeros((HORIZON, n)),
        terminated=jnp.asarray(terminated),
        truncated=jnp.zeros((HORIZON, n), bool),
        mask=jnp.asarray(mask),
        level=jnp.zeros((HORIZON, n), jnp.int32),
        score=jnp.zeros((HORIZON, n), jnp.int32),
    )


EPISODES = _all_episodes()
ENUMERATED = _batch(EPISODES, MU)  # every episode, behaviour mu


def _probabilities(params) -> jax.Array:
    """[N] p(tau; params) (deterministic transitions)."""
    logits, _ = POLICY.apply(params, ENUMERATED.observations)
    log_pi = policies.log_prob(logits, ENUMERATED.actions) * ENUMERATED.mask
    return jnp.exp(jnp.sum(log_pi, 0))


def _exact_gradient(params) -> np.ndarray:
    returns = jnp.sum(ENUMERATED.rewards, 0)

    def objective(p):
        return jnp.sum(_probabilities(p) * returns)

    return np.asarray(jax.grad(objective)(params)["logits"])


def _expected_estimate(name, params, **kwargs) -> np.ndarray:
    """E_mu[g_hat] of a per-trajectory estimator at the target ``params``: every
    episode's one-column estimate N sum_t w_t grad log pi, weighted by p_mu."""
    inputs = estimators.weight_inputs(params, ENUMERATED, POLICY.apply, ratios=True)
    dense = estimators.get_weights(name, **kwargs)(ENUMERATED, inputs).dense()
    p_mu = _probabilities(MU)
    n = dense.shape[1]
    weights = estimators.StepWeights({"w": dense * n * p_mu[None]}, {"w": jnp.ones(n)})
    grad = estimators.weighted_gradient(params, ENUMERATED, weights, POLICY.apply)
    return np.asarray(grad["logits"])


def test_the_enumeration_is_a_distribution():
    assert len(EPISODES) == 7  # 8 action sequences; (1, 1, .) end at t = 1
    for params in (MU, THETA):
        np.testing.assert_allclose(float(jnp.sum(_probabilities(params))), 1.0, 1e-6)


@pytest.mark.parametrize("name", ["trajectory_is", "per_decision_is"])
@pytest.mark.slow
def test_importance_sampling_is_unbiased_under_lag(name):
    exact = _exact_gradient(THETA)
    np.testing.assert_allclose(_expected_estimate(name, THETA), exact, atol=1e-5)
    assert estimators.spec(name).unbiased_off_policy


@pytest.mark.parametrize(
    "name, kwargs",
    [("naive", {}), ("truncated_is", {}), ("vtrace", {"gamma": 1.0, "vf_coef": 0.0})],
)
def test_biased_estimators_are_measurably_biased_under_lag(name, kwargs):
    exact = _exact_gradient(THETA)
    bias = np.abs(_expected_estimate(name, THETA, **kwargs) - exact).max()
    assert bias > 0.02 * np.abs(exact).max(), bias
    assert not estimators.spec(name).unbiased_off_policy
    # ... and at theta = mu they are unbiased (truncation and naive: exactly).
    if name != "vtrace":
        np.testing.assert_allclose(
            _expected_estimate(name, MU, **kwargs), _exact_gradient(MU), atol=1e-5
        )


# --------------------------------------------------------- weights at theta != mu


def _hand_objectives():
    """name -> (kwargs, J_hat(params, batch)) written with autodiff ratios."""
    b = ENUMERATED
    mask = b.mask
    returns = jnp.sum(b.rewards, 0)
    n = mask.shape[1]

    def log_ratio(p):
        logits, _ = POLICY.apply(p, b.observations)
        return (policies.log_prob(logits, b.actions) - b.log_probs) * mask

    def trajectory_is(p):
        return jnp.mean(jnp.exp(jnp.sum(log_ratio(p), 0)) * returns)

    def per_decision_is(p):
        return jnp.sum(jnp.exp(jnp.cumsum(log_ratio(p), 0)) * b.rewards * mask) / n

    group = (returns - returns.mean()) / (returns.std() + 1e-4)
    lengths = jnp.sum(mask, 0)

    def gspo(p, eps=4e-4):
        s = jnp.exp(jnp.sum(log_ratio(p), 0) / lengths)
        return jnp.mean(jnp.minimum(s * group, jnp.clip(s, 1 - eps, 1 + eps) * group))

    def cispo(p):
        logits, _ = POLICY.apply(p, b.observations)
        weight = jax.lax.stop_gradient(jnp.clip(jnp.exp(log_ratio(p)), 0.0, 1.28))
        log_pi = policies.log_prob(logits, b.actions)
        return jnp.sum(weight * group * log_pi * mask) / jnp.sum(mask)

    def dual_clip(p, eps=0.2, c=1.3):
        adv = jnp.where(b.rewards > 0.5, 1.0, -1.0) * mask  # given advantages
        r = jnp.exp(log_ratio(p))
        obj = jnp.minimum(r * adv, jnp.clip(r, 1 - eps, 1 + eps) * adv)
        obj = jnp.where(adv < 0, jnp.maximum(obj, c * adv), obj)
        return jnp.sum(obj * mask) / n

    adv = jnp.where(b.rewards > 0.5, 1.0, -1.0) * mask
    ppo = {"advantages": adv, "normalize_advantages": False, "vf_coef": 0.0}
    return {
        "trajectory_is": ({}, trajectory_is),
        "per_decision_is": ({}, per_decision_is),
        "gspo": ({"group_size": None}, gspo),
        "cispo": ({"group_size": None}, cispo),
        "ppo_dual_clip": (ppo | {"dual_clip": 1.3, "ent_coef": 0.0}, dual_clip),
    }


@pytest.mark.parametrize("name", list(_hand_objectives()))
@pytest.mark.slow
def test_ratio_aware_weights_are_the_gradient_of_the_objective(name):
    kwargs, objective = _hand_objectives()[name]
    params = THETA
    if name == "gspo":  # a small step: sequence ratios inside and outside the clip
        params = {"logits": MU["logits"] + 1e-3 * THETA["logits"], "value": MU["value"]}
    expected = jax.grad(objective)(params)["logits"]
    inputs = estimators.weight_inputs(params, ENUMERATED, POLICY.apply, ratios=True)
    step = estimators.get_weights(name, **kwargs)(ENUMERATED, inputs)
    fast = estimators.weighted_gradient(params, ENUMERATED, step, POLICY.apply)
    np.testing.assert_allclose(fast["logits"], expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected).max() > 1e-3
    # The loss's own gradient is the same weighting, and its value is -J_hat.
    loss = estimators.get_estimator(name, apply_fn=POLICY.apply, **kwargs)
    value, by_loss = jax.value_and_grad(lambda p: loss(p, ENUMERATED)[0])(params)
    np.testing.assert_allclose(-by_loss["logits"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, -objective(params), rtol=1e-5, atol=1e-6)


COUNTERPARTS = {
    "naive": ("reward_to_go", {}),
    "trajectory_is": ("reinforce", {}),
    "per_decision_is": ("reward_to_go", {}),
    "truncated_is": ("reward_to_go", {}),
    "ppo_clip": ("ppo_clip", {"vf_coef": 0.0, "ent_coef": 0.0}),
    "ppo_dual_clip": ("ppo_clip", {"vf_coef": 0.0, "ent_coef": 0.0}),
    "gspo": ("grpo", {"group_size": None}),
    "grpo": ("grpo", {"group_size": None}),
}


@pytest.mark.parametrize("name", list(COUNTERPARTS))
@pytest.mark.slow
def test_at_ratio_one_every_row_is_its_on_policy_counterpart_bit_for_bit(name):
    other, kwargs = COUNTERPARTS[name]
    own = {k: v for k, v in kwargs.items() if k in estimators.hyperparameters(name)}
    batch = ENUMERATED
    at_mu = estimators.weight_inputs(MU, batch, POLICY.apply, ratios=True)
    on_policy = at_mu._replace(log_probs=None)
    np.testing.assert_array_equal(batch.log_probs, at_mu.log_probs * batch.mask)
    lagged = estimators.get_weights(name, **own)(batch, at_mu).dense()
    reference = estimators.get_weights(other, **kwargs)(batch, on_policy).dense()
    np.testing.assert_array_equal(np.asarray(lagged), np.asarray(reference))


# ------------------------------------------------------------------ rlax as oracle


def _full_length_batch(params, seed=0, num_columns=4, num_steps=5) -> Trajectory:
    """Columns live for every step, terminated at the end (no padding)."""
    rng = np.random.default_rng(seed)
    states = rng.integers(0, 2, size=(num_steps, num_columns))
    obs = jax.nn.one_hot(states, 2)
    actions = jnp.asarray(rng.integers(0, 2, size=states.shape), jnp.int32)
    logits, values = POLICY.apply(params, obs)
    terminated = np.zeros(states.shape, bool)
    terminated[-1] = True
    return Trajectory(
        observations=obs,
        actions=actions,
        rewards=jnp.asarray(rng.normal(size=states.shape), jnp.float32),
        log_probs=policies.log_prob(logits, actions),
        values=values,
        next_values=jnp.concatenate([values[1:], jnp.zeros((1, num_columns))]),
        terminated=jnp.asarray(terminated),
        truncated=jnp.zeros(states.shape, bool),
        mask=jnp.ones(states.shape, jnp.float32),
        level=jnp.zeros(states.shape, jnp.int32),
        score=jnp.zeros(states.shape, jnp.int32),
    )


def _score_weighted_grad(params, batch, per_step_weights):
    def surrogate(p):
        logits, _ = POLICY.apply(p, batch.observations)
        return jnp.sum(per_step_weights * policies.log_prob(logits, batch.actions))

    return np.asarray(jax.grad(surrogate)(params)["logits"])


@pytest.mark.slow
def test_vtrace_matches_rlax():
    batch = _full_length_batch(MU)
    gamma, lam = 0.9, 0.8
    _, values = POLICY.apply(THETA, batch.observations)
    logits, _ = POLICY.apply(THETA, batch.observations)
    rho = jnp.exp(policies.log_prob(logits, batch.actions) - batch.log_probs)
    discount = gamma * (1.0 - batch.terminated.astype(jnp.float32))
    v_t = jnp.concatenate([values[1:], jnp.zeros((1, values.shape[1]))])

    def oracle(v_tm1, v_t, r, d, rho):
        return rlax.vtrace_td_error_and_advantage(v_tm1, v_t, r, d, rho, lam)

    out = jax.vmap(oracle, in_axes=1, out_axes=1)(
        values, v_t, batch.rewards, discount, rho
    )
    assert float(jnp.abs(rho - 1).max()) > 0.1
    loss = estimators.get_estimator(
        "vtrace", apply_fn=POLICY.apply, gamma=gamma, lam=lam, vf_coef=1.0
    )
    (_, aux), grad = jax.value_and_grad(loss, has_aux=True)(THETA, batch)
    expected = _score_weighted_grad(THETA, batch, out.pg_advantage) / 4
    np.testing.assert_allclose(-grad["logits"], expected, rtol=1e-5, atol=1e-6)
    # value loss = (1/B) sum 0.5 (V - v_s)^2, rlax's errors = v_s - V.
    expected_value_loss = 0.5 * float(jnp.sum(jnp.square(out.errors))) / 4
    np.testing.assert_allclose(float(aux.value_loss), expected_value_loss, rtol=1e-5)


def test_gae_matches_rlax():
    batch = _full_length_batch(MU, seed=1)
    gamma, lam = 0.9, 0.7
    discount = gamma * (1.0 - batch.terminated.astype(jnp.float32))
    values = jnp.concatenate([batch.values, jnp.zeros((1, 4))])

    def oracle(r, d, v):
        return rlax.truncated_generalized_advantage_estimation(r, d, lam, v)

    adv = jax.vmap(oracle, in_axes=1, out_axes=1)(batch.rewards, discount, values)
    loss = estimators.get_estimator(
        "gae", apply_fn=POLICY.apply, gamma=gamma, lam=lam, vf_coef=0.0
    )
    grad = jax.grad(lambda p: loss(p, batch)[0])(MU)
    expected = _score_weighted_grad(MU, batch, adv) / 4
    np.testing.assert_allclose(-grad["logits"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_ppo_clip_matches_rlax_away_from_the_behaviour(normalize):
    """Normalised: (A - mean) / (std + 1e-8) over the batch's steps (all live)."""
    batch = _full_length_batch(MU, seed=2)
    adv = jnp.asarray(np.random.default_rng(2).normal(1.0, 2.0, (5, 4)), jnp.float32)
    given = (adv - adv.mean()) / (adv.std() + 1e-8) if normalize else adv

    def oracle(p):
        logits, _ = POLICY.apply(p, batch.observations)
        ratio = jnp.exp(policies.log_prob(logits, batch.actions) - batch.log_probs)
        return rlax.clipped_surrogate_pg_loss(ratio.ravel(), given.ravel(), 0.2)

    loss = estimators.get_estimator(
        "ppo_clip",
        apply_fn=POLICY.apply,
        advantages=adv,
        normalize_advantages=normalize,
        vf_coef=0.0,
        ent_coef=0.0,
    )
    near = jax.tree.map(lambda m, t: m + 0.6 * (t - m), MU, THETA)
    (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(near, batch)
    # rlax averages over the T B steps, the estimator sums over T and averages over B
    np.testing.assert_allclose(float(value), 5 * float(oracle(near)), rtol=1e-5)
    expected = 5 * np.asarray(jax.grad(oracle)(near)["logits"])
    np.testing.assert_allclose(grad["logits"], expected, rtol=1e-5, atol=1e-6)
    logits, _ = POLICY.apply(near, batch.observations)
    ratio = jnp.exp(policies.log_prob(logits, batch.actions) - batch.log_probs)
    outside = float(jnp.mean(jnp.abs(ratio - 1.0) > 0.2))
    assert float(aux.clip_fraction) == pytest.approx(outside) and outside > 0


# ------------------------------------------------------- identities and padding


@pytest.mark.slow
def test_gae_with_lambda_one_is_reward_to_go_minus_value():
    batch = ENUMERATED  # on-policy at MU: batch.values = V under MU
    kwargs = {"vf_coef": 0.0}
    gae = estimators.get_estimator(
        "gae", apply_fn=POLICY.apply, gamma=1.0, lam=1.0, **kwargs
    )
    vb = estimators.get_estimator("value_baseline", apply_fn=POLICY.apply, **kwargs)
    g1 = jax.grad(lambda p: gae(p, batch)[0])(MU)
    g2 = jax.grad(lambda p: vb(p, batch)[0])(MU)
    np.testing.assert_allclose(g1["logits"], g2["logits"], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(g1["logits"])).max() > 1e-2


def _affine_apply(params, obs):
    """Logits and value affine in the observation: both nonzero on zeroed padding."""
    return obs @ params["w"] + params["b"], obs @ params["v"] + params["c"]


AFFINE = {
    "w": jnp.array([[0.3, -0.2], [0.1, 0.4]]),
    "b": jnp.array([0.5, -0.5]),
    "v": jnp.array([1.0, -2.0]),
    "c": jnp.array(0.7),
}


@pytest.mark.parametrize("name", ["value_baseline", "gae", "ppo_clip", "vtrace"])
def test_value_and_entropy_terms_with_padding_by_hand(name):
    batch = ENUMERATED  # lengths 2 and 3: padding
    assert np.any(np.asarray(batch.mask) == 0)
    mask = np.asarray(batch.mask)
    logits, values = (np.asarray(x) for x in _affine_apply(AFFINE, batch.observations))
    kw = {"vf_coef": 1.0, "ent_coef": 0.0}
    if name == "ppo_clip":
        kw |= {"normalize_advantages": False}
    loss = estimators.get_estimator(name, apply_fn=_affine_apply, **kw)
    (without, aux), _ = jax.value_and_grad(loss, has_aux=True)(AFFINE, batch)
    (with_entropy, _), _ = jax.value_and_grad(loss, has_aux=True)(
        AFFINE, batch, ent_coef=1.0
    )
    # entropy term: -(1/B) sum over live steps of H(pi(.|s_t))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    h = -(p * np.log(p)).sum(-1)
    n = mask.shape[1]
    np.testing.assert_allclose(
        float(with_entropy - without), -np.sum(h * mask) / n, rtol=1e-5
    )
    np.testing.assert_allclose(float(aux.entropy), np.sum(h * mask) / mask.sum(), 1e-5)
    # value loss: (1/B) sum over live steps of 0.5 (V(s_t) - target_t)^2
    rewards = np.asarray(batch.rewards) * mask
    if name == "value_baseline":
        targets = np.cumsum(rewards[::-1], 0)[::-1]
    elif name in ("gae", "ppo_clip"):  # gamma 0.99, lambda 0.95, batch values
        v_old, targets = np.asarray(batch.values), np.zeros_like(rewards)
        adv = np.zeros(n)
        for t in reversed(range(mask.shape[0])):
            nxt = v_old[t + 1] * mask[t + 1] if t + 1 < mask.shape[0] else 0.0
            nxt = np.where(np.asarray(batch.terminated[t]), 0.0, nxt)
            delta = rewards[t] + 0.99 * nxt - v_old[t]
            adv = delta + 0.99 * 0.95 * adv * (1 - np.asarray(batch.terminated[t]))
            targets[t] = (adv + v_old[t]) * mask[t]
    else:  # vtrace on-policy at its own critic (rho = 1): lam = 1 returns-to-go
        v = values * mask
        targets = np.zeros_like(rewards)
        acc = np.zeros(n)
        for t in reversed(range(mask.shape[0])):
            done = np.asarray(batch.terminated[t])
            acc = np.where(done, rewards[t], rewards[t] + 0.99 * acc)
            targets[t] = acc * mask[t]
        ratio_one = batch._replace(
            log_probs=jnp.asarray(
                np.asarray(policies.log_prob(jnp.asarray(logits), batch.actions))
            )
        )
        (_, aux), _ = jax.value_and_grad(loss, has_aux=True)(AFFINE, ratio_one)
        del v
    expected = np.sum(0.5 * mask * (values - targets) ** 2) / n
    np.testing.assert_allclose(float(aux.value_loss), expected, rtol=1e-5)
