"""Policy lag (rl_pg.variance.lag) on the enumerable MDP, checked against numpy."""

import functools
import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from rl_pg import checkpoint, enumerable, estimators, policies
from rl_pg.variance import lag

MDP = enumerable.DEFAULT_MDP
S, A = MDP.num_states, MDP.num_actions
APPLY = enumerable.mdp_policy(MDP).apply
VALUE = jnp.asarray([1.5, 1.0, 0.5], jnp.float32)
MU = {
    "logits": 0.3 * jnp.arange(S * A, dtype=jnp.float32).reshape(S, A),
    "value": VALUE,
}
PI = {"logits": jnp.asarray([[0.5, -0.2], [-0.4, 0.9], [0.1, 0.3]]), "value": VALUE}
LEVELS = (0.0, 0.003, 0.01, 0.03, 0.1)
CONFIG = lag.LagConfig(direction_batch=64, eval_batch=64)


def sample(key, params, n):
    return enumerable.sample_batch(key, params, n, MDP)


@pytest.fixture(scope="module")
def targets():
    return lag.targets_at_kl(jax.random.PRNGKey(3), MU, APPLY, sample, LEVELS, CONFIG)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_staleness(mu, pi, batch):
    """KL, max ratio, trajectory and per-step Kish ESS, step by step in numpy."""
    obs, actions, mask = (
        np.asarray(x) for x in (batch.observations, batch.actions, batch.mask)
    )
    log_mu, log_pi = _log_softmax(mu["logits"]), _log_softmax(pi["logits"])
    kls, ratios, traj = [], [], np.ones(mask.shape[1])
    for t, b in zip(*np.nonzero(mask > 0), strict=True):
        s, a = int(obs[t, b].argmax()), int(actions[t, b])
        kls.append(np.sum(np.exp(log_mu[s]) * (log_mu[s] - log_pi[s])))
        ratios.append(np.exp(log_pi[s, a] - log_mu[s, a]))
        traj[b] *= ratios[-1]
    ratios = np.array(ratios)
    ess = lambda w: w.sum() ** 2 / np.sum(w**2)  # noqa: E731
    return np.mean(kls), ratios.max(), ess(traj), ess(ratios)


@pytest.mark.slow
def test_staleness_matches_numpy():
    batch = sample(jax.random.PRNGKey(0), MU, 32)
    got = lag.staleness(MU, PI, APPLY, batch)
    kl, max_ratio, ess_traj, ess_step = _numpy_staleness(MU, PI, batch)
    assert float(got.kl) == pytest.approx(kl, rel=1e-5)
    assert float(got.max_ratio) == pytest.approx(max_ratio, rel=1e-5)
    assert float(got.ess_trajectory) == pytest.approx(ess_traj, rel=1e-4)
    assert float(got.ess_step) == pytest.approx(ess_step, rel=1e-4)
    assert float(got.num_steps) == float(np.sum(batch.mask))
    assert 0 < float(got.ess_trajectory) < 32


def test_staleness_ignores_what_padding_holds():
    """With a logit bias, even a zeroed padding observation has KL > 0: only the
    live steps may count (the mean over them, computed by hand)."""

    def biased(params, obs):  # logits obs @ L + L[0]
        logits, values = APPLY(params, obs)
        return logits + params["logits"][0], values

    batch = sample(jax.random.PRNGKey(0), MU, 32)
    assert (batch.mask == 0).any()  # crashes leave padded steps
    got = lag.staleness(MU, PI, biased, batch)
    obs, live = np.asarray(batch.observations), np.asarray(batch.mask) > 0
    lmu = _log_softmax(obs @ np.asarray(MU["logits"]) + np.asarray(MU["logits"][0]))
    lpi = _log_softmax(obs @ np.asarray(PI["logits"]) + np.asarray(PI["logits"][0]))
    per_step = np.sum(np.exp(lmu) * (lmu - lpi), axis=-1)
    assert float(got.kl) == pytest.approx(per_step[live].mean(), rel=1e-5)


@pytest.mark.slow
def test_staleness_at_mu_is_exactly_on_policy():
    batch = sample(jax.random.PRNGKey(1), MU, 16)
    got = lag.staleness(MU, MU, APPLY, batch)
    assert float(got.kl) == 0.0
    assert float(got.max_ratio) == 1.0 == float(got.min_ratio)
    assert float(got.ess_trajectory) == 16.0
    assert float(got.ess_step) == float(np.sum(batch.mask))


def test_kish_ess_by_hand():
    # (1 + 1 + 2)^2 / (1 + 1 + 4) = 16 / 6
    assert float(lag.kish_ess(jnp.array([1.0, 1.0, 2.0]))) == pytest.approx(16 / 6)
    # the masked 5 is left out: (1 + 3)^2 / (1 + 9) = 1.6
    w, m = jnp.array([1.0, 5.0, 3.0]), jnp.array([1.0, 0.0, 1.0])
    assert float(lag.kish_ess(w, m)) == pytest.approx(1.6)
    assert float(lag.kish_ess(jnp.zeros(4))) == 0.0
    assert float(lag.kish_ess(jnp.full(7, 3e-30))) == pytest.approx(7.0)
    log_w = jnp.log(jnp.array([1.0, 1.0, 2.0]))
    assert float(lag.kish_ess_log(log_w)) == pytest.approx(16 / 6, rel=1e-6)
    # exp(1000) overflows; the log form does not: weights (1, 1, ~0) -> 2
    assert float(lag.kish_ess_log(jnp.array([1000.0, 1000.0, 0.0]))) == pytest.approx(
        2.0
    )


@pytest.mark.slow
def test_direction_is_reproducible_unit_and_policy_only():
    d1 = lag.lag_direction(jax.random.PRNGKey(5), MU, APPLY, sample, CONFIG)
    d2 = lag.lag_direction(jax.random.PRNGKey(5), MU, APPLY, sample, CONFIG)
    d3 = lag.lag_direction(jax.random.PRNGKey(6), MU, APPLY, sample, CONFIG)
    assert np.array_equal(d1["logits"], d2["logits"])
    assert not np.allclose(d1["logits"], d3["logits"])
    assert float(lag._global_norm(d1)) == pytest.approx(1.0, rel=1e-6)
    assert np.all(np.asarray(d1["value"]) == 0)  # the critic does not move


@pytest.mark.slow
def test_direction_is_ppo_ascent():
    """d is -grad of ppo_clip (value/entropy off) at r = 1, normalised."""
    key = jax.random.PRNGKey(5)
    d = lag.lag_direction(key, MU, APPLY, sample, CONFIG)
    batch = sample(key, MU, CONFIG.direction_batch)
    loss = functools.partial(
        estimators.ppo_clip, apply_fn=APPLY, vf_coef=0.0, ent_coef=0.0
    )
    g = jax.jit(jax.grad(lambda p: loss(p, batch)[0]))(MU)["logits"]
    np.testing.assert_allclose(
        d["logits"], -g / np.linalg.norm(g), rtol=1e-5, atol=1e-7
    )


def test_zero_direction_is_an_error():
    def constant(key, params, n):  # every return equal: every advantage 0
        batch = sample(key, params, n)
        return batch._replace(
            rewards=jnp.zeros_like(batch.rewards), values=batch.values * 0
        )

    with pytest.raises(ValueError, match="PPO direction at mu has norm 0"):
        lag.lag_direction(jax.random.PRNGKey(0), MU, APPLY, constant, CONFIG)


@pytest.mark.slow
def test_kl_zero_is_mu_bit_for_bit(targets):
    first = targets[0]
    assert first.level == 0.0 and first.step == 0.0 and first.kl == 0.0
    assert first.max_ratio == 1.0
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(MU), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_levels_reached_in_order(targets):
    kls = [t.kl for t in targets]
    for t in targets[1:]:
        assert abs(t.kl - t.level) <= CONFIG.rel_tol * t.level
    assert all(b > a for a, b in zip(kls, kls[1:], strict=False))
    steps = [t.step for t in targets]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
    assert all(t.max_ratio > 1.0 for t in targets[1:])
    for t in targets:  # the critic stays mu's exactly
        assert np.asarray(t.params["value"]).tobytes() == np.asarray(VALUE).tobytes()


@pytest.mark.slow
def test_targets_kl_is_staleness_on_a_fresh_batch(targets):
    """The KL measured on the evaluation batch matches the KL on new data from mu."""
    batch = sample(jax.random.PRNGKey(99), MU, 4096)
    fresh = float(lag.staleness(MU, targets[-1].params, APPLY, batch).kl)
    assert fresh == pytest.approx(targets[-1].kl, rel=0.2)


def test_targets_reproducible(targets):
    again = lag.targets_at_kl(
        jax.random.PRNGKey(3), MU, APPLY, sample, LEVELS[:3], CONFIG
    )
    for a, b in zip(again, targets, strict=False):
        assert a.step == b.step and a.kl == b.kl
        assert np.array_equal(a.params["logits"], b.params["logits"])


@pytest.mark.parametrize(
    "levels, match",
    [
        ((), "empty"),
        ((0.0, -0.1), "finite and >= 0"),
        ((0.01, float("nan")), "finite and >= 0"),
        ((0.0, 0.01, 0.01), "strictly increasing"),
        ((0.03, 0.01), "strictly increasing"),
    ],
)
def test_bad_levels(levels, match):
    with pytest.raises(ValueError, match=match):
        lag.targets_at_kl(jax.random.PRNGKey(0), MU, APPLY, sample, levels, CONFIG)


@pytest.mark.slow
def test_unreachable_level():
    config = lag.LagConfig(
        direction_batch=16, eval_batch=16, initial_step=0.01, max_step=0.02
    )
    with pytest.raises(
        ValueError, match="KL level 0.1 is unreachable.*max_step = 0.02"
    ):
        lag.targets_at_kl(jax.random.PRNGKey(0), MU, APPLY, sample, (0.1,), config)


@pytest.mark.parametrize(
    "field, value", [("eval_batch", 0), ("rel_tol", 0.0), ("max_step", float("inf"))]
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=f"LagConfig.{field}"):
        lag.LagConfig(**{field: value})


# ---------------------------------------------------------------- checkpoints

SHIPPED = "rl_pg/checkpoints/partial"


def test_save_target_round_trip(tmp_path):
    _, params, *_ = checkpoint.load_policy(SHIPPED)
    target = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x), params)
    out = lag.save_target(
        tmp_path / "kl_0.01", target, SHIPPED, kl=0.0101, max_ratio=1.7, lag_level=0.01
    )
    _, loaded, _, _, meta = checkpoint.load_policy(out)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(target), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    behaviour = checkpoint.read_meta(SHIPPED)
    assert (
        meta["policy"] == behaviour["policy"] and meta["env_id"] == behaviour["env_id"]
    )
    assert meta["reward_scale"] == behaviour["reward_scale"]
    assert (
        meta["lag_kl"] == 0.0101
        and meta["max_ratio"] == 1.7
        and meta["lag_level"] == 0.01
    )
    assert meta["behaviour"].endswith("rl_pg/checkpoints/partial")
    assert not [k for k in meta if k.startswith("held_out_")]
    assert lag.target_name(0.003) == "kl_0.003" and lag.target_name(0.0) == "kl_0"


def _fake_run(root, steps, policy=None):
    for n in steps:
        d = root / "checkpoints" / "evaluations" / f"env_steps_{n:012d}"
        d.mkdir(parents=True)
        meta = {
            "policy": policy or {"kind": "mlp", "num_actions": 2},
            "env_id": "FlappyBird-v0",
        }
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "params.msgpack").write_bytes(b"")
    return root


def test_checkpoint_pairs(tmp_path):
    run = _fake_run(tmp_path, [4096, 512, 1024, 2048])  # written out of order
    (tmp_path / "checkpoints" / "evaluations" / "notes").mkdir()
    names = lambda pairs: [(a.name[-4:], b.name[-4:]) for a, b in pairs]  # noqa: E731
    assert names(lag.checkpoint_pairs(run, 1)) == [
        ("0512", "1024"),
        ("1024", "2048"),
        ("2048", "4096"),
    ]
    assert names(lag.checkpoint_pairs(run, 3)) == [("0512", "4096")]


@pytest.mark.parametrize(
    "k, match", [(0, ">= 1"), (4, "kept 4 .* at least 5"), ("1", "an int")]
)
def test_checkpoint_pairs_errors(tmp_path, k, match):
    run = _fake_run(tmp_path, [1, 2, 3, 4])
    with pytest.raises(ValueError, match=match):
        lag.checkpoint_pairs(run, k)


def test_checkpoint_pairs_other_errors(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        lag.checkpoint_pairs(tmp_path / "missing", 1)
    with pytest.raises(ValueError, match="kept 0"):
        lag.checkpoint_pairs(tmp_path, 1)
    run = _fake_run(tmp_path / "run", [1, 2])
    _fake_run(tmp_path / "run", [3], policy={"kind": "cnn", "num_actions": 2})
    with pytest.raises(ValueError, match="another policy or env"):
        lag.checkpoint_pairs(run, 1)


# ---------------------------------------------------------------- exact truth


def trajectory_is(params, batch, *, apply_fn):
    """-(1/B) sum_i sg(rho_{0:T-1}) R_i sum_t log pi(a_t|s_t), rho = pi / behaviour."""
    logits, _ = apply_fn(params, batch.observations)
    log_pi = policies.log_prob(logits, batch.actions) * batch.mask
    log_rho = jnp.sum(log_pi - batch.log_probs * batch.mask, axis=0)
    returns = jnp.sum(batch.rewards * batch.mask, axis=0)
    weight = jax.lax.stop_gradient(jnp.exp(log_rho) * returns)
    return -jnp.mean(weight * jnp.sum(log_pi, axis=0)), None


def _numpy_is_columns(mu, pi):
    """y(tau) = rho(tau) R(tau) sum_t (onehot(a_t) - pi(.|s_t)) at s_t; p_mu(tau)."""
    e = enumerable.enumerate_trajectories(MDP)
    log_mu, log_pi = _log_softmax(mu["logits"]), _log_softmax(pi["logits"])
    n = len(e.returns)
    y, probs = np.zeros((n, S * A + S)), np.zeros(n)
    for i in range(n):
        live = e.mask[i] > 0
        s, a = e.states[i][live], e.actions[i][live]
        log_p_mu = np.sum(log_mu[s, a])
        rho = np.exp(np.sum(log_pi[s, a]) - log_p_mu)
        score = np.zeros((S, A))
        for st, at in zip(s, a, strict=True):
            score[st] += np.eye(A)[at] - np.exp(log_pi[st])
        y[i, : S * A] = rho * e.returns[i] * score.ravel()
        probs[i] = np.exp(log_p_mu + e.log_prob_env[i])
    return y, probs


@pytest.mark.slow
def test_exact_trajectory_is_is_unbiased_at_a_lagged_target(targets):
    pi = targets[3].params  # KL 0.03
    loss = functools.partial(trajectory_is, apply_fn=APPLY)
    mean, variance = lag.exact_off_policy(MU, pi, loss, MDP)
    truth = lag.exact_gradient(pi, MDP)
    np.testing.assert_allclose(mean, truth, atol=1e-6)
    y, probs = _numpy_is_columns(MU, pi)
    m = probs @ y
    np.testing.assert_allclose(mean, m, atol=1e-6)
    assert variance == pytest.approx(probs @ np.sum(y * y, 1) - m @ m, rel=1e-5)
    assert variance > 0


def test_exact_gradient_against_numpy(targets):
    pi = targets[-1].params
    got = lag.exact_gradient(pi, MDP)
    e = enumerable.enumerate_trajectories(MDP)
    log_pi = _log_softmax(pi["logits"])
    g = np.zeros((S, A))
    for i in range(len(e.returns)):
        live = e.mask[i] > 0
        s, a = e.states[i][live], e.actions[i][live]
        p = np.exp(np.sum(log_pi[s, a]) + e.log_prob_env[i])
        for st, at in zip(s, a, strict=True):
            g[st] += p * e.returns[i] * (np.eye(A)[at] - np.exp(log_pi[st]))
    np.testing.assert_allclose(got[: S * A], g.ravel(), atol=1e-6)
    assert np.all(got[S * A :] == 0)
    flat = jax.flatten_util.ravel_pytree(enumerable.exact_gradient(pi, MDP))[0]
    np.testing.assert_allclose(got, flat, atol=1e-5)


def test_exact_naive_is_biased_and_exact_at_mu(targets):
    pi = targets[3].params
    naive = estimators.get_estimator("reward_to_go", apply_fn=APPLY)
    mean, _ = lag.exact_off_policy(MU, pi, naive, MDP)
    assert np.max(np.abs(mean - lag.exact_gradient(pi, MDP))) > 1e-2
    at_mu, _ = lag.exact_off_policy(MU, MU, naive, MDP)
    np.testing.assert_allclose(at_mu, lag.exact_gradient(MU, MDP), atol=1e-6)


@pytest.mark.slow
def test_off_policy_columns_at_kl_zero_equal_on_policy(targets):
    """At KL 0 the IS estimate equals REINFORCE's column by column, bit for bit."""
    is_loss = functools.partial(trajectory_is, apply_fn=APPLY)
    reinforce = estimators.get_estimator("reinforce", apply_fn=APPLY)
    y_is, p, _ = lag.off_policy_columns(MU, targets[0].params, is_loss, MDP)
    y_re, p_re, _ = lag.off_policy_columns(MU, MU, reinforce, MDP)
    np.testing.assert_allclose(y_is, y_re, rtol=1e-6, atol=1e-7)
    assert np.array_equal(p, p_re)
