"""The estimator-variance benchmark on the enumerable MDP, whose gradient is exact."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rl_pg import enumerable, estimators, variance

IID = ("reinforce", "reward_to_go", "constant_baseline", "optimal_baseline")


@pytest.fixture(scope="module")
def setup():
    policy = enumerable.mdp_policy()
    params = policy.init(jax.random.PRNGKey(1), jnp.zeros(3))
    params = jax.tree.map(
        lambda x: x + 0.3 * jnp.arange(x.size).reshape(x.shape), params
    )
    problem = variance.Problem(
        policy.apply,
        functools.partial(_sample, group_size=1),
        group_size=1,
    )
    config = variance.StudyConfig(
        batch_sizes=(4, 16, 64),
        num_batches=300,
        reference_trajectories=2**15,
        chunk=2**13,
        num_bootstrap=100,
        suite=variance.SuiteConfig(names=IID + ("mean_baseline",)),
    )
    runners = variance.make_runners(problem, config)
    result = variance.study_stage(
        params, runners, config, enumerable.DEFAULT_MDP.horizon
    )
    exact = np.asarray(ravel_pytree(enumerable.exact_gradient(params))[0])
    return params, problem, config, runners, result, exact


def _sample(key, params, n, group_size):
    return enumerable.sample_batch(key, params, n, group_size=group_size)


def _rows(result, estimator):
    return {r["batch_size"]: r for r in result.rows if r["estimator"] == estimator}


def test_reference_gradient_matches_the_exact_gradient(setup):
    _, _, _, _, result, exact = setup
    # |g_ref - g| is within 4 standard errors (chi-like: se is the norm's scale)
    assert abs(result.reference_norm - np.linalg.norm(exact)) < 4 * result.reference_se


def test_unbiased_estimators_have_bias_within_noise(setup):
    *_, result, _ = setup
    for name in IID:
        for n, row in _rows(result, name).items():
            # E[bias2] = variance / M + se_ref^2 for an unbiased estimator
            assert row["bias2"] < 4 * row["bias2_noise"], (name, n, row)


def test_mean_baseline_shrinks_by_n_minus_one_over_n(setup):
    *_, result, exact = setup
    g2 = float(np.sum(exact**2))
    for n, row in _rows(result, "mean_baseline").items():
        expected = (1 / n) ** 2 * g2  # ||((n-1)/n - 1) g||^2
        assert row["bias2"] > expected - 4 * row["bias2_noise"]
        if n == 4:
            assert row["bias2"] > 3 * row["bias2_noise"]  # clearly biased


def test_iid_variance_scales_as_one_over_n(setup):
    *_, result, _ = setup
    per_traj = result.per_trajectory
    for name, key in (
        ("reinforce", "reinforce (b = 0)"),
        ("reward_to_go", "reward_to_go"),
    ):
        for n, row in _rows(result, name).items():
            predicted = per_traj[key] / n
            # M = 300 batches: the variance estimate's relative error is ~ sqrt(2/M)
            assert (
                row["variance_lo"] < predicted * 1.1
                and row["variance_hi"] > predicted * 0.9
            )
            assert abs(row["variance"] / predicted - 1) < 0.3, (name, n)


def test_baselines_reduce_per_trajectory_variance(setup):
    *_, result, _ = setup
    v = result.per_trajectory
    assert v["optimal scalar b*"] <= v["constant b = E[R]"] + 1e-9
    assert v["optimal per-parameter b*"] <= v["optimal scalar b*"] + 1e-9
    assert v["constant b = E[R]"] < v["reinforce (b = 0)"]


def test_chunked_moments_equal_unchunked():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, (1000, 7))
    ret = rng.normal(size=1000)
    whole = variance.TrajectoryMoments()
    whole.update({"x": data}, {"R": ret.sum()})
    parts = variance.TrajectoryMoments()
    for lo, hi in ((0, 1), (1, 300), (300, 301), (301, 1000)):
        parts.update({"x": data[lo:hi]}, {"R": ret[lo:hi].sum()})
    np.testing.assert_allclose(parts.mean["x"], data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(parts.m2["x"], whole.m2["x"], rtol=1e-10)
    assert parts.trace_variance("x") == pytest.approx(data.var(0, ddof=1).sum())
    assert parts.count == 1000 and parts.sums["R"] == pytest.approx(ret.sum())


@pytest.mark.parametrize("block_steps", [8, 2048])  # blocks of 2 trajectories, 1 block
def test_trajectory_gradients_equal_the_estimators_per_trajectory(setup, block_steps):
    params, problem, config, _, _, _ = setup
    config = dataclasses.replace(config, block_steps=block_steps)
    runners = variance.make_runners(problem, config)
    traj = problem.sample(jax.random.PRNGKey(3), params, 8)
    traj = traj._replace(rewards=traj.rewards + 0.25)  # rewards on every live step
    score, rtg, ret = runners.trajectory_grads(params, traj)
    rtg_loss = estimators.get_estimator("reward_to_go", apply_fn=problem.apply_fn)
    reinforce = estimators.get_estimator("reinforce", apply_fn=problem.apply_fn)
    for i in range(8):
        column = jax.tree.map(lambda x, i=i: x[:, i : i + 1], traj)
        expected_rtg = variance.flat_gradient(rtg_loss, params, column)
        expected_reinforce = variance.flat_gradient(reinforce, params, column)
        np.testing.assert_allclose(rtg[i], expected_rtg, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            ret[i] * score[i], expected_reinforce, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            ret[i], np.sum(np.where(column.mask > 0, column.rewards, 0)), rtol=1e-6
        )


def test_batch_estimates_do_not_depend_on_chunking(setup):
    params, _, _, runners, _, _ = setup
    key = jax.random.PRNGKey(5)
    a = variance.batch_estimates(params, runners, key, 16, 6, 1, constant_b=0.5)
    b = variance.batch_estimates(params, runners, key, 16, 6, 4, constant_b=0.5)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
    # common random numbers: REINFORCE and reward-to-go saw the same batches, so
    # their estimates are strongly correlated across batches
    x, y = a["reinforce"].ravel(), a["reward_to_go"].ravel()
    assert np.corrcoef(x, y)[0, 1] > 0.5


def test_summarize_matches_direct_formulas():
    rng = np.random.default_rng(1)
    E = rng.normal(1.0, 1.0, (40, 5))
    g = np.ones(5)
    s = variance.summarize(E, g, num_bootstrap=50)
    mean = E.mean(0)
    assert s["bias2"] == pytest.approx(np.sum((mean - g) ** 2))
    assert s["variance"] == pytest.approx(np.sum(E.var(0, ddof=1)))
    assert s["mse"] == pytest.approx(np.mean(np.sum((E - g) ** 2, 1)))
    cos = E @ g / np.linalg.norm(E, axis=1) / np.linalg.norm(g)
    assert s["cos_true"] == pytest.approx(cos.mean())
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    C = U @ U.T
    assert s["cos_pairwise"] == pytest.approx((C.sum() - 40) / (40 * 39))
    for m in variance.METRICS:
        assert s[f"{m}_lo"] <= s[m] <= s[f"{m}_hi"] or m == "snr"


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="num_batches"):
        variance.StudyConfig(num_batches=1)
    with pytest.raises(ValueError, match="chunk"):
        variance.StudyConfig(reference_trajectories=1000, chunk=300)
    policy = enumerable.mdp_policy()
    problem = variance.Problem(
        policy.apply, functools.partial(_sample, group_size=4), 4
    )
    with pytest.raises(ValueError, match="multiples of group_size"):
        variance.make_runners(
            problem,
            variance.StudyConfig(
                batch_sizes=(6,), chunk=1024, reference_trajectories=2048
            ),
        )
    with pytest.raises(ValueError, match="Unknown estimators"):
        variance.make_runners(
            problem,
            variance.StudyConfig(
                suite=variance.SuiteConfig(names=("nope",)),
                chunk=1024,
                reference_trajectories=2048,
            ),
        )


def test_block_size():
    assert variance.block_size(2048, 256, 2048, 1) == 8
    assert variance.block_size(2048, 128, 2048, 4) == 16
    assert variance.block_size(24, 256, 2048, 1) == 8  # largest divisor <= 8
    assert variance.block_size(12, 256, 2048, 4) == 4  # a multiple of the devices
    assert variance.block_size(8, 4096, 2048, 1) == 1
