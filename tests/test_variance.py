"""The estimator-variance study on the enumerable MDP, whose answers are exact.

The study runs with groups of G = 4 episodes per level (as the presets do), so the
grouped estimators, the clustered reference error and the mean baseline's (G-1)/G
shrink are all exercised. A row "agrees" with an exact value when it lies within 5
of its own standard errors (the 95% interval's half-width / 1.96); the coverage of
the intervals themselves is measured in ``test_calibration.py``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rl_pg import checkpoint, distributed, enumerable, estimators, variance
from rl_pg.variance import exact, job, moments, pipeline, report, statistics
from rl_pg.variance import stages as stages_lib
from rl_pg.variance import study as study_lib

G = 4
IID = ("reinforce", "reward_to_go", "constant_baseline", "value_baseline")
NAMES = IID + ("mean_baseline", "rloo", "dr_grpo", "gae")
CONFIG = variance.StudyConfig(
    batch_sizes=(4, 16, 64),
    num_batches=32,
    max_batches_per_size=512,
    reference_trajectories=2**14,
    reference_groups=64,
    chunk=2**12,
    suite=variance.SuiteConfig(names=NAMES),
)


@pytest.fixture(scope="module")
def setup():
    problem = exact.enumerable_problem(G)
    params = exact.enumerable_policies()["skewed"]
    runners = variance.make_runners(problem, CONFIG)
    result = variance.study_stage(
        params, runners, CONFIG, enumerable.DEFAULT_MDP.horizon
    )
    g = np.asarray(ravel_pytree(enumerable.exact_gradient(params))[0])
    return params, problem, runners, result, g


def _rows(result, estimator):
    return {r["batch_size"]: r for r in result.rows if r["estimator"] == estimator}


def _se(row, metric):
    return (row[f"{metric}_hi"] - row[f"{metric}_lo"]) / (2 * 1.96)


@pytest.mark.slow
def test_reference_gradient_is_close_to_the_exact_gradient(setup):
    params, _, runners, result, g = setup
    moments, _ = variance.trajectory_moments(
        params, runners, jax.random.PRNGKey(9), 2**14, 2**12, 64
    )
    _, g_ref = variance.reference_gradient(moments)
    se2 = exact.reference_se2(params, 2**14, G)
    # E||g_ref - g||^2 = se2 (P = 9): 10 se2 is far in the tail; a sign flip or a
    # scaled reference is far outside it
    assert np.sum((g_ref - g) ** 2) < 10 * se2
    assert np.sum((-g_ref - g) ** 2) > 10 * se2
    assert result.reference_norm == pytest.approx(np.linalg.norm(g), rel=0.2)


@pytest.mark.slow
def test_reference_error_treats_levels_as_clusters(setup):
    params, _, runners, result, _ = setup
    exact_se2 = exact.reference_se2(params, CONFIG.reference_trajectories, G)
    assert result.reference_se**2 == pytest.approx(exact_se2, rel=0.35)


def test_reference_error_counts_correlated_levels_once():
    """y_ij = u_i + e_ij: trajectories of level i share u_i (intra-level correlation
    rho = 0.8). The clustered error matches the truth; the naive one is 1 + (G-1)
    rho = 3.4 times too small."""
    rng = np.random.default_rng(0)
    P, levels, group_levels = 50, 4096, 8
    tau2, sigma2 = 0.8, 0.2
    u = rng.normal(0, np.sqrt(tau2), (levels, 1, P))
    y = (u + rng.normal(0, np.sqrt(sigma2), (levels, G, P))).reshape(-1, P)
    moments = variance.TrajectoryMoments()
    size = G * group_levels
    moments.group_R_s = list(y.reshape(-1, size, P).sum(1))
    moments.group_s = [np.zeros(P)] * len(moments.group_R_s)
    moments.group_count = [size] * len(moments.group_R_s)
    moments.sums, moments.count = {"R": 0.0}, len(y)
    groups, _ = variance.reference_gradient(moments)
    se2 = statistics.summarize(rng.normal(size=(8, P)), groups)["se_ref"] ** 2
    truth = P * (tau2 / levels + sigma2 / len(y))
    naive = np.sum(y.var(0, ddof=1)) / len(y)
    assert se2 == pytest.approx(truth, rel=0.2)
    assert naive < truth / 3


@pytest.mark.slow
def test_unbiased_estimators_have_zero_bias_within_their_error(setup):
    *_, result, _ = setup
    for name in IID + ("rloo",):
        for n, row in _rows(result, name).items():
            assert row["exact_bias2"] == pytest.approx(0.0, abs=1e-9), (name, n)
            assert abs(row["bias2"]) < 5 * _se(row, "bias2"), (name, n, row)


@pytest.mark.slow
def test_mean_baseline_shrinks_by_g_minus_one_over_g(setup):
    *_, result, g = setup
    expected = float(np.sum(g**2)) / G**2  # ||((G-1)/G - 1) g||^2, at every n
    for n, row in _rows(result, "mean_baseline").items():
        assert row["exact_bias2"] == pytest.approx(expected, rel=1e-6)
        assert abs(row["bias2"] - expected) < 5 * _se(row, "bias2"), (n, row)
        assert row["bias2_lo"] > 0, n  # clearly biased, even at n = 64
        assert row["cos_mean"] > 0.98  # the same direction: a pure rescaling


@pytest.mark.slow
def test_dr_grpo_shrink_is_exact(setup):
    *_, result, g = setup
    c = (G - 1) / (G * enumerable.DEFAULT_MDP.horizon)
    for n, row in _rows(result, "dr_grpo").items():
        assert row["exact_bias2"] == pytest.approx((1 - c) ** 2 * np.sum(g**2))
        assert abs(row["bias2"] - row["exact_bias2"]) < 5 * _se(row, "bias2"), n


@pytest.mark.slow
def test_iid_batch_variance_matches_the_exact_grouped_variance(setup):
    *_, result, _ = setup
    for name in IID + ("gae",):
        rows = _rows(result, name)
        for n, row in rows.items():
            log_error = np.log(row["variance"] / row["exact_variance"])
            log_se = np.log(row["variance_hi"] / row["variance_lo"]) / (2 * 1.96)
            assert abs(log_error) < 5 * log_se, (name, n, row)
        # exact: an i.i.d. estimator's variance is inversely proportional to n
        assert rows[4]["exact_variance"] == pytest.approx(
            16 * rows[64]["exact_variance"], rel=1e-9
        )
        slope, lo, hi = result.slopes[name]
        assert abs(slope + 1) < 0.15 and lo < -1 < hi, (name, slope, lo, hi)


@pytest.mark.slow
def test_sub_batches_give_more_batches_at_small_sizes(setup):
    *_, runners, result, _ = setup
    assert runners.sub_batches == {4: 16, 16: 4, 64: 1}
    rows = _rows(result, "reinforce")
    assert [rows[n]["num_batches"] for n in (4, 16, 64)] == [512, 128, 32]


@pytest.mark.slow
def test_baselines_reduce_per_trajectory_variance(setup):
    *_, result, _ = setup
    v = result.per_trajectory
    assert v[variance.ORACLE_SCALAR] <= v["constant b = E[R]"] + 1e-9
    assert v[variance.ORACLE_PER_PARAMETER] <= v[variance.ORACLE_SCALAR] + 1e-9
    assert v["constant b = E[R]"] < v["reinforce (b = 0)"]


@pytest.mark.slow
def test_critic_calibration_is_computed_on_the_study_scale(setup):
    params, *_ = setup
    problem = exact.enumerable_problem(G)
    scaled = problem._replace(
        apply_fn=variance.critic_in_reward_units(problem.apply_fn, 0.1),
        sample=lambda key, p, n: enumerable.sample_batch(key, p, n, group_size=G),
    )
    obs = jax.nn.one_hot(jnp.arange(3), 3)
    _, v = problem.apply_fn(params, obs)
    _, v10 = scaled.apply_fn(params, obs)
    np.testing.assert_allclose(v10, 10 * v, rtol=1e-6)
    sums = np.array([4.0, 4.0, 8.0, 4.0, 16.0, 8.0])  # V = 1, G = 2 on 4 steps
    cal = variance.critic_calibration(sums)
    assert cal["mean_value"] == 1.0 and cal["mean_return_to_go"] == 2.0
    assert np.isnan(cal["correlation"])  # constant V has no correlation


def test_checkpoint_critic_is_put_back_into_raw_reward_units(tmp_path):
    """The shipped critics learned rewards x 0.1: the study divides V by 0.1."""
    path = stages_lib.shipped_checkpoints()[1]  # partial
    _, _, _, _, meta = checkpoint.load_policy(path)
    assert meta["reward_scale"] == 0.1
    stage = stages_lib.flappy_stages([path], horizon=8, group_size=2)[0]
    policy, params, env, env_params, _ = checkpoint.load_policy(path)
    obs, _ = env.reset(jax.random.PRNGKey(0), env_params)
    _, raw = policy.apply(params, obs)
    _, studied = stage.problem.apply_fn(params, obs)
    assert float(studied) == pytest.approx(10 * float(raw), rel=1e-5)
    assert stage.description["critic_reward_scale"] == 0.1


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
@pytest.mark.slow
def test_trajectory_gradients_equal_the_estimators_per_trajectory(setup, block_steps):
    params, problem, *_ = setup
    config = dataclasses.replace(CONFIG, block_steps=block_steps)
    runners = variance.make_runners(problem, config)
    traj = problem.sample(jax.random.PRNGKey(3), params, 8)
    traj = traj._replace(rewards=traj.rewards + 0.25)  # rewards on every live step
    score, rtg, ret, _ = runners.trajectory_grads(params, traj)
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


@pytest.mark.slow
def test_batch_estimates_do_not_depend_on_chunking(setup):
    params, _, runners, _, _ = setup
    key = jax.random.PRNGKey(5)
    a = variance.batch_estimates(params, runners, key, 6, 1, constant_b=0.5)
    b = variance.batch_estimates(params, runners, key, 6, 4, constant_b=0.5)
    for n in a:  # equal up to float rounding (XLA may fuse 1 and 4 batches apart)
        for name in a[n]:
            np.testing.assert_allclose(a[n][name], b[n][name], rtol=1e-5, atol=1e-6)
    # common random numbers: REINFORCE and reward-to-go saw the same batches
    x, y = a[4]["reinforce"].ravel(), a[4]["reward_to_go"].ravel()
    assert np.corrcoef(x, y)[0, 1] > 0.5
    # nested sizes: the n = 64 estimate of a per-trajectory estimator is the mean of
    # the 16 n = 4 estimates cut from the same batch
    np.testing.assert_allclose(
        a[4]["reinforce"].reshape(6, 16, -1).mean(1),
        a[64]["reinforce"],
        rtol=1e-4,
        atol=1e-6,
    )


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="num_batches"):
        variance.StudyConfig(num_batches=1)
    variance.StudyConfig(num_batches=16_384, max_batches_per_size=16_384)  # the cap
    with pytest.raises(ValueError, match="max_batches_per_size must be <= 16,384"):
        variance.StudyConfig(max_batches_per_size=16_385)
    with pytest.raises(ValueError, match="chunk"):
        variance.StudyConfig(reference_trajectories=1000, chunk=300)
    with pytest.raises(ValueError, match="divide the largest"):
        variance.StudyConfig(batch_sizes=(4, 6, 16))
    problem = exact.enumerable_problem(4)
    with pytest.raises(ValueError, match="multiples of group_size"):
        variance.make_runners(
            problem,
            variance.StudyConfig(
                batch_sizes=(6,), chunk=1024, reference_trajectories=2048
            ),
        )
    with pytest.raises(ValueError, match="whole levels"):
        variance.make_runners(
            problem,
            variance.StudyConfig(
                batch_sizes=(4,),
                chunk=1024,
                reference_trajectories=2048,
                reference_groups=1024,
            ),
        )
    with pytest.raises(ValueError, match="Unknown estimator .nope."):
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


def test_log_slope_and_its_interval():
    n = np.array([4, 16, 64])
    rng = np.random.default_rng(0)
    replicates = 5.0 / n * np.exp(rng.normal(0, 0.01, (20, 3)))
    variances = np.vstack([5.0 / n, replicates])
    slope, lo, hi = statistics.log_slope(n, variances)
    assert slope == pytest.approx(-1.0)
    assert lo < -1 < hi and hi - lo < 0.2
    slope2, *_ = statistics.log_slope(n, np.vstack([5.0 / n**0.5, replicates]))
    assert slope2 == pytest.approx(-0.5)


@pytest.mark.slow
def test_exact_mode_job_writes_every_output(tmp_path):
    """`rl-pg variance --problem enumerable` end to end, on small sizes."""
    config = dataclasses.replace(CONFIG, num_batches=8, max_batches_per_size=32)
    out = pipeline.run(
        job.preset("quick", "enumerable", study=config),
        tmp_path / "study",
        progress=False,
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "results.csv",
        "slopes.csv",
        "per_trajectory.csv",
        "report.md",
        "config.json",
        "performance.json",
        "rel_variance_vs_batch_size.png",
        "variance_vs_batch_size.png",
        "cosine_vs_batch_size.png",
    } <= names
    rows = report.read_results(out / "results.csv")
    assert len(rows) == 3 * len(NAMES) * 3  # stages x estimators x sizes
    assert {r["checkpoint"] for r in rows} == {"uniform", "skewed", "peaked"}
    by_name = {r["estimator"]: r for r in rows if r["batch_size"] == 4}
    assert by_name["reinforce"]["exact_bias2"] == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(by_name["reinforce"]["exact_variance"])
    assert np.isnan(by_name["rloo"]["exact_variance"])  # unknown stays empty
    text = (out / "report.md").read_text()
    assert "exact bias2" in text and "oracle" in text and "Critic calibration" in text
    with pytest.raises(FileExistsError):
        pipeline.run(
            job.preset("quick", "enumerable", study=config), out, progress=False
        )
    with pytest.raises(ValueError, match="problem"):
        pipeline.run(job.preset("quick", "atari"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_stage_labels_are_unique():
    assert stages_lib.stage_labels(["a/ckpt/best", "b/ckpt/best"]) == [
        "a/ckpt/best",
        "b/ckpt/best",
    ]
    assert stages_lib.stage_labels(["a/ckpt/best", "a/ckpt/last"]) == ["best", "last"]
    with pytest.raises(ValueError, match="twice"):
        stages_lib.stage_labels(["a/best", "a/best"])


@pytest.mark.slow
def test_decompose_in_exact_mode_writes_the_decomposition(tmp_path, capsys):
    """`rl-pg variance --problem enumerable --decompose`: estimates beside exact,
    and a progress bar over the policies while it decomposes."""
    config = dataclasses.replace(
        CONFIG,
        batch_sizes=(4,),
        num_batches=8,
        max_batches_per_size=8,
        suite=variance.SuiteConfig(names=("reinforce",)),
    )
    out = pipeline.run(
        job.preset("quick", "enumerable", study=config, decompose=True),
        tmp_path / "d",
        progress=True,
    )
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    done = [line for line in bar if line.startswith("variance decomposition")]
    assert done and "3/3" in done[-1], bar  # one step per policy
    import csv

    with open(out / "decomposition.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["component"] for r in rows} == {"state", "action", "trajectory", "total"}
    assert len({r["checkpoint"] for r in rows}) == 3
    for r in rows:
        if r["estimator"] == "reward_to_go":
            lo, hi, ex = (
                float(r["variance_lo"]),
                float(r["variance_hi"]),
                float(r["exact_variance"]),
            )
            half = (hi - lo) / 2
            assert lo - 2 * half <= ex <= hi + 2 * half, r  # within ~4 se
    assert (out / "decomposition.png").stat().st_size > 0
    assert "Variance decomposed" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_study_whose_returns_are_all_equal_is_well_defined(recwarn):
    """No signal: the reference gradient is 0 with error 0; no NaN warnings."""
    mdp = enumerable.DEFAULT_MDP._replace(
        rewards=np.zeros_like(enumerable.DEFAULT_MDP.rewards)
    )
    policy = enumerable.mdp_policy(mdp)
    problem = variance.Problem(
        policy.apply,
        lambda key, p, n: enumerable.sample_batch(key, p, n, mdp, group_size=G),
        G,
    )
    config = dataclasses.replace(
        CONFIG,
        batch_sizes=(4, 16),
        num_batches=8,
        max_batches_per_size=32,
        suite=variance.SuiteConfig(names=("reinforce", "rloo")),
    )
    params = exact.enumerable_policies()["skewed"]
    result = variance.study_stage(
        params, variance.make_runners(problem, config), config, mdp.horizon
    )
    assert result.reference_norm == 0.0 and result.reference_se == 0.0
    for row in result.rows:
        assert row["variance"] == 0.0 and row["bias2"] == 0.0
        assert np.isnan(row["snr"]) and row["rel_variance"] == np.inf
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_flappy_stages_carry_their_env_and_share_runners_by_architecture():
    paths = stages_lib.shipped_checkpoints()
    stages = stages_lib.flappy_stages(paths, horizon=8, group_size=2)
    assert all(s.env is not None and s.env_params is not None for s in stages)
    assert len({s.key for s in stages}) == 1  # same policy, env and critic scale
    assert [s.label for s in stages] == ["initial", "partial", "good"]


def test_each_stage_keeps_its_own_architecture_and_env(tmp_path):
    """Two runs' `best` checkpoints with different networks and step limits."""
    from rl_pg import policies

    shipped = stages_lib.shipped_checkpoints()[1]
    small = policies.mlp_policy(2, hidden=(8,), activation="relu")
    params = small.init(jax.random.PRNGKey(0), jnp.zeros(12))
    other = tmp_path / "runY" / "checkpoints" / "best"
    checkpoint.save_policy(
        other,
        params,
        policy={"kind": "mlp", "num_actions": 2, "hidden": [8], "activation": "relu"},
        env_id="FlappyBird-v0",
        env_kwargs={"max_steps_in_episode": 50},
    )
    first = tmp_path / "runX" / "checkpoints" / "best"
    first.parent.mkdir(parents=True)
    first.symlink_to(shipped, target_is_directory=True)
    stages = stages_lib.flappy_stages([first, other], horizon=8, group_size=2)
    assert [s.label for s in stages] == [
        "runX/checkpoints/best",
        "runY/checkpoints/best",
    ]
    assert stages[0].key != stages[1].key  # separate runners
    assert int(stages[1].env_params.max_steps_in_episode) == 50
    assert int(stages[0].env_params.max_steps_in_episode) == 10_000
    obs = jnp.zeros(12)
    for stage in stages:  # each apply_fn fits its own params
        logits, _ = stage.problem.apply_fn(stage.params, obs)
        assert logits.shape == (2,)


ALL_STUDIED = variance.SuiteConfig().names  # every estimator, with and without weights
FAST_CONFIG = dataclasses.replace(
    CONFIG,
    num_batches=4,
    max_batches_per_size=64,
    reference_trajectories=2**10,
    reference_groups=16,
    chunk=2**9,
    block_steps=16,  # blocks of 4 trajectories: the blocked VJP path
    suite=variance.SuiteConfig(names=ALL_STUDIED),
)


@pytest.fixture(scope="module")
def fast_and_loss_path():
    """study_stage on the enumerable MDP through the per-step weights (one VJP per
    batch) and through every estimator's own loss gradient, same seed."""
    problem = exact.enumerable_problem(G)
    params = exact.enumerable_policies()["skewed"]
    horizon = enumerable.DEFAULT_MDP.horizon
    runners = {
        fast: variance.make_runners(problem, FAST_CONFIG, fast=fast)
        for fast in (True, False)
    }
    results = {
        fast: variance.study_stage(params, r, FAST_CONFIG, horizon)
        for fast, r in runners.items()
    }
    return params, runners, results


@pytest.mark.slow
def test_fast_batch_estimates_equal_each_loss_gradient(fast_and_loss_path):
    params, runners, _ = fast_and_loss_path
    key = jax.random.PRNGKey(11)
    estimates = {  # 4 batches per call: the shape study_stage compiled
        fast: variance.batch_estimates(params, r, key, 4, 4, constant_b=0.7)
        for fast, r in runners.items()
    }
    assert set(estimates[True]) == {4, 16, 64}
    for n, by_name in estimates[False].items():
        assert set(by_name) == set(ALL_STUDIED)
        for name, by_loss in by_name.items():
            scale = np.abs(by_loss).max()
            assert scale > 0, (n, name)
            np.testing.assert_allclose(
                estimates[True][n][name], by_loss, rtol=1e-4, atol=1e-5 * scale
            )


@pytest.mark.slow
def test_fast_path_gives_the_same_results(fast_and_loss_path):
    """The rows of results.csv, up to float rounding."""
    _, _, results = fast_and_loss_path
    fast, by_loss = results[True], results[False]
    assert len(fast.rows) == len(by_loss.rows) == 3 * len(ALL_STUDIED)
    for a, b in zip(fast.rows, by_loss.rows, strict=True):
        assert (a["estimator"], a["batch_size"]) == (b["estimator"], b["batch_size"])
        for metric in statistics.METRICS:
            assert a[metric] == pytest.approx(b[metric], rel=1e-3, abs=1e-6), (
                a["estimator"],
                a["batch_size"],
                metric,
            )
    assert fast.slopes.keys() == by_loss.slopes.keys()
    for name in fast.slopes:
        np.testing.assert_allclose(fast.slopes[name], by_loss.slopes[name], rtol=1e-3)


@pytest.mark.slow
def test_device_chunk_sums_equal_the_host_float64_moments(setup):
    """trajectory_moments reduces each chunk on the device (float32, products with R
    about the chunk's mean return); the moments equal a float64 accumulation of the
    same per-trajectory gradients up to float rounding."""
    params, problem, runners, *_ = setup
    key = jax.random.PRNGKey(9)
    moments, _ = variance.trajectory_moments(params, runners, key, 2**13, 2**12, 8)
    host = variance.TrajectoryMoments()
    group_R_s = []
    for i in range(2):
        traj = runners.sample(jax.random.fold_in(key, i), params, 2**12)
        score, rtg, ret, _ = (
            np.asarray(x, np.float64) for x in runners.trajectory_grads(params, traj)
        )
        reinforce = ret[:, None] * score
        host.update(
            {"reward_to_go": rtg},
            {
                "R": ret.sum(),
                "s2": (score**2).sum(0),
                "R_s": reinforce.sum(0),
                "R2_s2": (reinforce**2).sum(0),
            },
        )
        group_R_s += list(reinforce.reshape(4, 2**10, -1).sum(1))
    for stat in ("mean", "m2"):
        np.testing.assert_allclose(
            getattr(moments, stat)["reward_to_go"],
            getattr(host, stat)["reward_to_go"],
            rtol=1e-5,
        )
    for name in ("R", "s2", "R_s", "R2_s2"):
        np.testing.assert_allclose(moments.sums[name], host.sums[name], rtol=1e-5)
    np.testing.assert_allclose(np.stack(moments.group_R_s), group_R_s, rtol=1e-5)


@pytest.mark.slow
def test_concurrent_devices_give_the_one_device_numbers_bit_for_bit(setup):
    """Chunks dealt to devices in turn (here one device listed twice, so a process
    with one device runs the same code path) are merged in order: the moments equal
    those of one device exactly, with an odd number of chunks so that the last
    round is partial."""
    params, problem, runners, *_ = setup
    device = jax.local_devices()[0]
    twice = variance.make_runners(problem, CONFIG, concurrent_devices=(device,) * 2)
    several = jax.local_device_count() > 1  # every CPU device, or jit's placement
    assert runners.concurrent_devices == (tuple(jax.local_devices()) if several else ())
    assert twice.concurrent_devices == (device, device)
    key = jax.random.PRNGKey(9)
    one, perf_one = variance.trajectory_moments(
        params, runners, key, 3 * 2**10, 2**10, 6
    )
    two, perf_two = variance.trajectory_moments(params, twice, key, 3 * 2**10, 2**10, 6)
    assert (perf_one["gradient_devices"], perf_two["gradient_devices"]) == (1, 2)
    assert len(two.group_R_s) == 6 and two.count == one.count == 3 * 2**10
    for name in one.sums:
        np.testing.assert_array_equal(two.sums[name], one.sums[name], err_msg=name)
    np.testing.assert_array_equal(two.mean["reward_to_go"], one.mean["reward_to_go"])
    np.testing.assert_array_equal(two.m2["reward_to_go"], one.m2["reward_to_go"])
    np.testing.assert_array_equal(np.stack(two.group_R_s), np.stack(one.group_R_s))
    np.testing.assert_array_equal(np.stack(two.group_s), np.stack(one.group_s))
    _, perf_one_chunk = variance.trajectory_moments(params, twice, key, 2**10, 2**10, 2)
    assert perf_one_chunk["gradient_devices"] == 1  # devices at work, not listed
    with pytest.raises(ValueError, match="at least one device"):
        variance.make_runners(problem, CONFIG, concurrent_devices=())
    mesh = distributed.batch_mesh([device])
    with pytest.raises(ValueError, match="combined with a mesh"):
        variance.make_runners(problem, CONFIG, mesh, concurrent_devices=[device])


@pytest.mark.slow
def test_dealt_batch_calls_give_the_one_device_estimates_bit_for_bit(
    setup, monkeypatch
):
    """Batch calls dealt to the devices in turn (one device listed twice), with
    an odd number of calls so that the last round is partial, give the estimates
    of one device exactly; below ``MIN_DEALT_CALLS`` calls per device they stay on
    one device."""
    params, problem, runners, *_ = setup
    device = jax.local_devices()[0]
    one = variance.make_runners(problem, CONFIG, concurrent_devices=(device,))
    twice = variance.make_runners(problem, CONFIG, concurrent_devices=(device,) * 2)
    key = jax.random.PRNGKey(4)
    monkeypatch.setattr(study_lib, "MIN_DEALT_CALLS", 1)
    ref, perf_one = study_lib.timed_batch_estimates(params, one, key, 5, 1, 0.5)
    dealt, perf_two = study_lib.timed_batch_estimates(params, twice, key, 5, 1, 0.5)
    assert (perf_one["batch_devices"], perf_two["batch_devices"]) == (1, 2)
    assert perf_two["batch_flops_per_s"] > 0
    for n in ref:
        for name in ref[n]:
            np.testing.assert_array_equal(dealt[n][name], ref[n][name], err_msg=name)
    monkeypatch.setattr(study_lib, "MIN_DEALT_CALLS", 4)
    _, perf = study_lib.timed_batch_estimates(params, twice, key, 5, 1, 0.5)
    assert perf["batch_devices"] == 1


def test_chunk_sums_keep_small_return_differences():
    """Returns 1000 + u with |u| ~ 1e-2: the constant baseline b = E[R] leaves
    Var[(R - b) s] ~ 1e-4 Var[R s]; float32 raw sums of R s would lose it, sums about
    the chunk's mean return keep it."""
    rng = np.random.default_rng(0)
    C, P = 512, 6
    score = rng.normal(size=(C, P)).astype(np.float32)
    ret = (1000.0 + rng.normal(0, 1e-2, C)).astype(np.float32)
    found = variance.chunk_sums(score, score, ret, 128)
    sums, group_R_s, group_s = found.raw_sums()
    moments = variance.TrajectoryMoments()
    moments.merge(C, {}, {}, sums)
    s, R = score.astype(np.float64), ret.astype(np.float64)
    b = R.mean()
    expected = np.sum(np.var((R - b)[:, None] * s, 0))  # tr Var, as baseline_variances
    got = moments.baseline_variances()["constant b = E[R]"]
    assert got == pytest.approx(expected, rel=1e-3)
    np.testing.assert_allclose(
        group_R_s - b * group_s,
        ((R - b)[:, None] * s).reshape(4, 128, P).sum(1),
        rtol=1e-3,
        atol=1e-6,
    )


def test_chunk_sums_refuse_groups_that_do_not_divide_the_chunk():
    score = jnp.ones((8, 3))
    with pytest.raises(ValueError, match="must divide the chunk"):
        moments.chunk_sums(score, score, jnp.ones(8), 3)
