"""Tests for rl_pg.variance.decomposition: nested estimates against exact values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiles import compiles

import rl_pg
from rl_pg import enumerable
from rl_pg.policies import mlp_policy
from rl_pg.variance import decomposition as dec

PARTS = ("state", "action", "trajectory")
BASELINE_FREE_STATE = (  # share the state part of reward-to-go exactly
    "reward_to_go",
    "value_baseline",
    "oracle_value_baseline",
    "oracle_advantage",
)


def _table(rows):
    return {(r["estimator"], r["component"]): r for r in rows}


def _se(row):
    return (row["variance_hi"] - row["variance_lo"]) / (2 * 1.959963984540054)


@pytest.fixture(scope="module")
def tabular_params():
    key_logits, key_value = jax.random.split(jax.random.PRNGKey(1))
    return {
        "logits": 0.7 * jax.random.normal(key_logits, (3, 2)),
        "value": jnp.array([2.0, 1.5, 1.0]) + 0.1 * jax.random.normal(key_value, (3,)),
    }


@pytest.fixture(scope="module")
def exact(tabular_params):
    return _table(dec.decompose_exact(tabular_params))


@pytest.fixture(scope="module")
def estimated(tabular_params):
    rows = dec.decompose_enumerable(
        jax.random.PRNGKey(7),
        tabular_params,
        num_states=1500,
        num_actions=3,
        num_continuations=3,
    )
    return _table(rows)


@pytest.mark.slow
def test_exact_parts_sum_to_the_exact_total_and_obey_the_baseline_identities(exact):
    for name in dec.ESTIMATORS:
        parts = [exact[(name, c)]["variance"] for c in PARTS]
        assert min(parts) > -1e-9, name
        np.testing.assert_allclose(sum(parts), exact[(name, "total")]["variance"])
    # a state-only baseline (or Q - V) does not move E[y|s]: same state part;
    # the oracle advantage is NOT free of a state part (E[(Q-V) g | s] is the
    # policy gradient at s), it has exactly reward-to-go's
    state = [exact[(n, "state")]["variance"] for n in BASELINE_FREE_STATE]
    np.testing.assert_allclose(state, state[0], rtol=1e-6)
    assert state[0] > 1e-3
    # R_<t and b(s) are constants given (s, a): same trajectory part
    traj = [
        exact[(n, "trajectory")]["variance"]
        for n in (
            "reinforce",
            "reward_to_go",
            "value_baseline",
            "oracle_value_baseline",
        )
    ]
    np.testing.assert_allclose(traj, traj[0], rtol=1e-6)
    assert abs(exact[("oracle_advantage", "trajectory")]["variance"]) < 1e-9
    np.testing.assert_allclose(
        exact[("oracle_advantage", "action")]["variance"],
        exact[("oracle_value_baseline", "action")]["variance"],
        rtol=1e-6,
    )
    # the ideal critic beats the learned one, which beats no baseline
    assert (
        exact[("oracle_value_baseline", "total")]["variance"]
        < exact[("value_baseline", "total")]["variance"]
        < exact[("reward_to_go", "total")]["variance"]
    )


@pytest.mark.slow
def test_exact_total_by_hand_at_horizon_one():
    # H = 1: the state is s_0 ~ p0, every episode has one step (weight p(tau)), and
    # y = r(s, a, o) grad log pi(a|s), so tr Var(y) = E||y||^2 - ||E y||^2 directly.
    mdp = enumerable.make_mdp(horizon=1)
    params = {"logits": jnp.array([[0.3, -0.2], [1.0, 0.0], [-0.5, 0.4]])}
    rows = _table(dec.decompose_exact(params, mdp))
    pi = np.asarray(jax.nn.softmax(params["logits"]), np.float64)
    ys, ps = [], []
    for s in range(3):
        for a in range(2):
            g = np.zeros((3, 2))
            g[s] = -pi[s]
            g[s, a] += 1.0  # d log softmax / d logits[s]
            for o in range(4):
                ps.append(mdp.initial[s] * pi[s, a] * mdp.transitions[s, a, o])
                ys.append(mdp.rewards[s, a, o] * g.ravel())
    ys, ps = np.array(ys), np.array(ps)
    mu = ps @ ys
    total = ps @ np.sum(ys**2, 1) - mu @ mu
    np.testing.assert_allclose(rows[("reinforce", "total")]["variance"], total)
    np.testing.assert_allclose(rows[("reward_to_go", "total")]["variance"], total)


@pytest.mark.slow
def test_states_are_uniform_over_the_live_steps_of_an_episode(tabular_params):
    mdp = enumerable.DEFAULT_MDP
    policy = enumerable.mdp_policy(mdp)
    point = jax.jit(
        lambda key: dec._sample_states(
            key, tabular_params, policy.apply, dec._MDPEnv(mdp), None, 20000, 4
        )
    )(jax.random.PRNGKey(3))
    _, probs, _ = enumerable.enumerated_batch(tabular_params, mdp)
    mask = enumerable.enumerate_trajectories(mdp).mask
    p = np.asarray(probs, np.float64)
    expected = (p / mask.sum(1)) @ mask  # P(t) = E[1{t < L} / L]
    freq = np.bincount(np.asarray(point.t), minlength=4) / 20000
    se = np.sqrt(expected * (1 - expected) / 20000)
    assert np.all(np.abs(freq - expected) < 4 * se), (freq, expected)


@pytest.mark.slow
def test_nested_estimates_match_the_exact_parts(estimated, exact):
    for name in dec.ESTIMATORS:
        for comp in (*PARTS, "total"):
            est, truth = estimated[(name, comp)], exact[(name, comp)]["variance"]
            se = _se(est)
            if name == "oracle_advantage" and comp == "trajectory":
                assert est["variance"] == 0.0 and se == 0.0
                continue
            assert abs(est["variance"] - truth) < 4 * se, (name, comp, est, truth)


def test_nested_estimates_keep_the_algebraic_identities(estimated):
    traj = [
        estimated[(n, "trajectory")]["variance"]
        for n in (
            "reinforce",
            "reward_to_go",
            "value_baseline",
            "oracle_value_baseline",
        )
    ]
    np.testing.assert_allclose(traj, traj[0], rtol=1e-5)
    for comp in ("state", "action"):
        np.testing.assert_allclose(
            estimated[("oracle_advantage", comp)]["variance"],
            estimated[("oracle_value_baseline", comp)]["variance"],
        )
    # the ideal critic removes the trajectory part, nothing else
    assert (
        estimated[("oracle_advantage", "total")]["variance"]
        < 0.3 * (estimated[("value_baseline", "total")]["variance"])
    )


def test_parts_sum_to_the_separate_total_on_the_enumerable_mdp(estimated):
    for name in dec.ESTIMATORS:
        diff = estimated[(name, "sum_minus_total")]
        assert diff["variance_lo"] <= 0.0 <= diff["variance_hi"], (name, diff)
        assert _se(diff) > 0


@pytest.fixture(scope="module")
def flappy():
    env, env_params = rl_pg.make("FlappyBird-v0")
    policy = mlp_policy(2, hidden=(16,))
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros(12))
    return policy, params, env, env_params


@pytest.mark.slow
def test_tiny_flappy_decomposition_returns_finite_rows(flappy):
    policy, params, env, env_params = flappy
    rows = dec.decompose(
        jax.random.PRNGKey(1),
        params,
        policy.apply,
        env,
        env_params,
        num_states=16,
        num_actions=2,
        num_continuations=2,
        horizon=32,
    )
    keys = {"checkpoint", "estimator", "component", "variance"}
    keys |= {"variance_lo", "variance_hi"}
    assert all(set(r) == keys and r["checkpoint"] == "" for r in rows)
    assert {r["estimator"] for r in rows} == set(dec.ESTIMATORS)
    table = _table(rows)
    assert len(table) == len(rows) == len(dec.ESTIMATORS) * 7
    for name in dec.ESTIMATORS:
        for comp in dec.COMPONENTS + ("sum", "sum_minus_total"):
            r = table[(name, comp)]
            assert np.isfinite(
                [r["variance"], r["variance_lo"], r["variance_hi"]]
            ).all()
            assert r["variance_lo"] <= r["variance"] <= r["variance_hi"]
        assert table[(name, "trajectory")]["variance"] >= 0.0


@pytest.mark.slow
def test_parts_sum_to_the_separate_total_on_flappy_bird(flappy):
    policy, params, env, env_params = flappy
    rows = _table(
        dec.decompose(
            jax.random.PRNGKey(2),
            params,
            policy.apply,
            env,
            env_params,
            num_states=96,
            num_actions=2,
            num_continuations=2,
            horizon=32,
            value_scale=2.0,
        )
    )
    for name in dec.ESTIMATORS:
        diff = rows[(name, "sum_minus_total")]
        assert diff["variance_lo"] <= 0.0 <= diff["variance_hi"], (name, diff)
    assert rows[("reward_to_go", "total")]["variance"] > 0


def test_plot_is_written_atomically(tmp_path, estimated):
    rows = list(estimated.values())
    rows += [dict(r, checkpoint="later") for r in rows]
    path = tmp_path / "decomposition.png"
    dec.plot_decomposition(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["decomposition.png"]


@pytest.mark.parametrize(
    "sizes", [dict(num_states=2), dict(num_actions=1), dict(num_continuations=1)]
)
def test_bad_sizes_raise(tabular_params, sizes):
    kwargs = dict(num_states=8, num_actions=2, num_continuations=2) | sizes
    with pytest.raises(ValueError):
        dec.decompose_enumerable(jax.random.PRNGKey(0), tabular_params, **kwargs)


@pytest.mark.slow
def test_decompose_enumerable_compiles_once(caplog):
    """A second call with other params and key reuses the compiled sampler (it
    used to build a new apply_fn and env, static jit arguments: ~5 s a call)."""
    from rl_pg.variance import exact as exact_lib

    policies = exact_lib.enumerable_policies()
    sizes = dict(num_states=8, num_actions=2, num_continuations=2)
    first = compiles(
        lambda: dec.decompose_enumerable(
            jax.random.PRNGKey(0), policies["uniform"], **sizes, gamma=0.9
        ),
        caplog,
    )
    assert first  # the log does show compilations
    again = compiles(
        lambda: dec.decompose_enumerable(
            jax.random.PRNGKey(1), policies["skewed"], **sizes, gamma=0.9
        ),
        caplog,
    )
    assert again == []


def test_decomposed_estimators_come_from_the_registry(monkeypatch):
    """The rows' estimators are the registry's (in its order) that the branches
    can weight; a new registered estimator needs no edit here (it is left out),
    and one taken out of the registry leaves the decomposition."""
    from rl_pg import estimators

    assert dec.decomposed_estimators() == dec.ESTIMATORS
    assert dec.ESTIMATORS[:4] == ("reinforce", "reward_to_go", "value_baseline", "gae")
    toy = estimators.EstimatorSpec(
        "toy", estimators.REGISTRY["reinforce"].loss, per_trajectory=True
    )
    registry = {"toy": toy} | dict(estimators.REGISTRY)
    registry.pop("gae")
    monkeypatch.setattr(estimators, "REGISTRY", registry)
    assert dec.decomposed_estimators() == (
        "reinforce",
        "reward_to_go",
        "value_baseline",
        *dec.ORACLES,
    )
    registry.pop("value_baseline")
    with pytest.raises(ValueError, match="value_baseline"):
        dec.decomposed_estimators()
