"""The policy-lag study (rl_pg.variance.lag_study): KL 0 equals on-policy bit for
bit, the per-sub-batch gradient path equals each loss's own jax.grad, exact mode
against an enumeration written here, CLI errors, the lag preset end to end."""

import csv
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rl_pg import checkpoint, cli, enumerable
from rl_pg.variance import exact, lag, lag_study, stages, study
from rl_pg.variance import job as job_lib
from rl_pg.variance.problems import estimator_suite, flat_gradient, suite_specs

MDP = enumerable.DEFAULT_MDP
PROBLEM = exact.enumerable_problem(4)
MU = exact.enumerable_policies()["skewed"]
PI = {
    **MU,
    "logits": MU["logits"] + jnp.asarray([[0.4, -0.3], [-0.5, 0.2], [0.3, 0.6]]),
}
CONFIG = job_lib.preset(
    "lag", "enumerable", sizes=dict(batch_sizes=(4, 8), num_batches=4)
).study
# importance-weighted rows and their on-policy counterparts at ratio 1
COUNTERPARTS = {
    "trajectory_is": "reinforce",
    "per_decision_is": "naive",
    "truncated_is": "naive",
    "ppo_dual_clip": "ppo_clip",
    "gspo": "grpo",
}


def _batch_outputs(mu, pi):
    fn = jax.jit(lag_study.lag_batch_fn(PROBLEM, CONFIG))
    return jax.device_get(fn(mu, pi, jax.random.PRNGKey(1), jnp.float32(0.5)))


@pytest.mark.slow
def test_kl_zero_rows_equal_their_on_policy_counterparts_bit_for_bit():
    out, kl = _batch_outputs(MU, MU)
    names = list(suite_specs(CONFIG.suite))
    for n, (est, clip, diag) in out.items():
        for row, twin in COUNTERPARTS.items():
            a, b = est[:, names.index(row)], est[:, names.index(twin)]
            np.testing.assert_array_equal(a, b, err_msg=f"{row} vs {twin}, n={n}")
            assert np.abs(a).max() > 0
        np.testing.assert_array_equal(diag[:, 0], n)  # every ratio exactly 1
        np.testing.assert_array_equal(diag[:, 2], 0.0)
        assert np.all(np.isnan(clip[:, names.index("trajectory_is")]))
        np.testing.assert_array_equal(clip[:, names.index("ppo_clip")], 0.0)
    assert kl[0] == 0.0
    # and away from KL 0 they differ
    out, kl = _batch_outputs(MU, PI)
    est = out[8][0]
    assert not np.array_equal(est[:, names.index("trajectory_is")],
                              est[:, names.index("reinforce")])  # fmt: skip
    assert kl[0] > 0


@pytest.mark.slow
def test_lag_gradients_equal_each_loss_own_grad():
    """Per sub-batch: declared weights with ratios + one VJP == -grad loss on the
    same sub-batch carrying mu's log-probs (clipped steps depend on the batch)."""
    b = jnp.float32(0.5)
    batch = PROBLEM.sample(jax.random.PRNGKey(2), MU, 8)
    log_mu, log_pi, values, _ = lag_study._log_probs(PROBLEM.apply_fn, MU, PI, batch)
    batch = batch._replace(log_probs=log_mu)
    declared = lag_study._declarations(PROBLEM, CONFIG.suite, b)
    losses = estimator_suite(PROBLEM, CONFIG.suite, constant_b=b)
    est, clip = jax.jit(
        lambda: lag_study._sub_estimates(
            PROBLEM, declared, losses, PI, batch, log_pi, values
        )
    )()
    for i, name in enumerate(suite_specs(CONFIG.suite)):
        want = flat_gradient(losses[name], PI, batch)
        np.testing.assert_allclose(est[i], want, rtol=2e-5, atol=2e-6, err_msg=name)
        aux = losses[name](PI, batch)[1]
        if not np.isnan(clip[i]):
            np.testing.assert_allclose(clip[i], aux.clip_fraction, atol=1e-6)
    assert np.nanmax(np.asarray(clip)) > 0  # some steps are clipped at this lag


def _enumerated_truth(mu, pi):
    """Every trajectory of the MDP: p_mu, p_pi, R, grad log p_pi (numpy, float64)."""
    e = enumerable.enumerate_trajectories(MDP)

    def log_policy(params, states, actions, mask):
        log_pi = jax.nn.log_softmax(params["logits"], axis=-1)
        return jnp.sum(mask * log_pi[states, actions])

    def probs(params):
        lp = jax.vmap(log_policy, in_axes=(None, 0, 0, 0))(
            params, e.states, e.actions, e.mask
        )
        return np.exp(np.asarray(lp, np.float64) + e.log_prob_env)

    score = jax.vmap(jax.grad(log_policy), in_axes=(None, 0, 0, 0))(
        pi, e.states, e.actions, e.mask
    )
    score = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(score), np.float64)
    return probs(mu), probs(pi), np.asarray(e.returns, np.float64), score


@pytest.mark.slow
def test_exact_mode_unbiased_is_zero_bias_clipped_positive():
    p_mu, p_pi, R, score = _enumerated_truth(MU, PI)
    g = (p_pi * R) @ score  # grad J at the target, by enumeration
    y_is = ((p_pi / p_mu) * R)[:, None] * score  # trajectory IS, one column
    np.testing.assert_allclose(p_mu @ y_is, g, atol=1e-9)
    np.testing.assert_allclose(lag.exact_gradient(PI), g, rtol=1e-5, atol=1e-6)
    stage = stages.Stage("skewed", MU, PROBLEM, MDP.horizon, "e", {})
    point = lag_study.LagPoint(stage, PI, "kl_x", 0.05)
    found = lag_study.exact_lag_values(point, CONFIG.suite, (4, 8), 0.5)
    g2 = float(g @ g)
    for name in ("trajectory_is", "per_decision_is"):
        assert found[8][name]["bias2"] < 1e-9 * g2, name
    for name in ("truncated_is", "naive", "reinforce"):
        assert found[8][name]["bias2"] > 1e-3 * g2, name
    # the trajectory-IS variance from this enumeration (levels of G = 4)
    _, _, s0 = enumerable.enumerated_batch(MU, MDP)
    want = exact.grouped_batch_variance(y_is, p_mu, np.asarray(s0), 8, 4)
    np.testing.assert_allclose(found[8]["trajectory_is"]["variance"], want, rtol=1e-4)
    assert np.isnan(found[8]["grpo"]["bias2"])  # not per-trajectory: unknown


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--lag-kl=-0.01,0.1"], "lag_kl levels must be finite and >= 0"),
        (["--lag-kl", "0.1,0.01"], "strictly increasing"),
        (["--lag-kl", "0,x"], "comma-separated numbers"),
        (["--lag-kl", "0,0.1", "--lag-checkpoints", "1"], "not both"),
        (["--lag-checkpoints", "0", "--run", "somewhere"], "must be >= 1"),
        (["--lag-checkpoints", "2"], "needs --run"),
    ],
)
def test_cli_lag_errors_are_one_line(capsys, tmp_path, flags, expected, monkeypatch):
    def no_study(*args, **kwargs):
        raise AssertionError("the study started")

    monkeypatch.setattr(lag_study, "run", no_study)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["variance", "--out", str(tmp_path / "o"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rl-pg variance: error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "o").exists()


def test_lag_flags_parse_into_the_job():
    job = job_lib.preset("quick", lag_kl="0,0.01")
    assert job.lag_kl == (0.0, 0.01)
    assert job.study.suite.names == job_lib.LAG_ESTIMATORS
    assert job_lib.VarianceJob.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    quick = job_lib.preset("quick")
    assert quick.lag_kl is None and "naive" not in quick.study.suite.names
    with pytest.raises(ValueError, match="kept policies"):
        job_lib.preset("quick", checkpoints=["a", "b"], lag_checkpoints=2)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_lag_preset_end_to_end_tiny(tmp_path):
    """The lag preset at tiny sizes on the shipped good policy: files, targets
    saved as loadable checkpoints with their KL, KL-0 rows equal their
    counterparts through the study, diagnostics."""
    good = stages.shipped_checkpoints()[-1]
    job = job_lib.preset(
        "lag",
        sizes=dict(batch_sizes=(4, 8), num_batches=4, reference_trajectories=64),
        horizon=64,
        checkpoints=[str(good)],
        lag_kl=(0.0, 0.02),
    )
    out = lag_study.run(job, stages.job_stages(job), tmp_path / "lag", progress=False)
    for name in ("results.csv", "staleness.csv", "report.md", "vs_staleness.png",
                 "vs_staleness.pdf", "vs_staleness.svg", "config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 * 2 * len(job.study.suite.names)
    at = {(r["target"], r["estimator"], r["batch_size"]): r for r in rows}
    for row, twin in COUNTERPARTS.items():
        for n in ("4", "8"):
            a, b = at[("kl_0", row, n)], at[("kl_0", twin, n)]
            assert [a[m] for m in study.METRICS] == [b[m] for m in study.METRICS]
    zero, lagged = (
        at[("kl_0", "trajectory_is", "8")],
        at[("kl_0.02", "trajectory_is", "8")],
    )
    assert float(zero["lag_kl"]) == 0 and float(zero["ess"]) == 8
    assert float(zero["max_ratio"]) == 1
    assert 0.01 < float(lagged["lag_kl"]) < 0.04 and float(lagged["ess"]) < 8
    assert float(lagged["max_ratio"]) > 1
    assert zero["clip_fraction"] == "nan"
    assert 0 <= float(at[("kl_0.02", "ppo_clip", "8")]["clip_fraction"]) <= 1
    target = out / "lag_targets" / "good" / "kl_0.02"
    meta = checkpoint.read_meta(target)
    assert abs(meta["lag_kl"] - 0.02) < 1e-4 and meta["lag_level"] == 0.02
    checkpoint.load_policy(target)  # rl-pg variance --checkpoints takes it
    text = (out / "report.md").read_text()
    assert "## Staleness" in text and "Lowest relative MSE" in text
    assert "bias2 overtakes variance" in text
    # rl-pg plot redraws a lag study's own figure, and no batch-size figure of it
    from rl_pg import figures

    redrawn = figures.plot(out, estimators=["naive", "trajectory_is"], fmt="svg")
    assert redrawn == out / "vs_staleness_redrawn.svg"  # the study's own kept
    assert "series:good:mse:naive" in redrawn.read_text()
    with pytest.raises(ValueError, match="is a lag study: its figure is"):
        figures.plot(out, figure="batch_size")


@pytest.mark.slow
def test_lag_study_on_a_cartpole_run(tmp_path):
    """Any env: a tiny CartPole PPO run (kept checkpoints) under --lag-checkpoints 1
    (real training lag) and its last policy under --lag-kl, through the CLI."""
    run = tmp_path / "run"
    cli.main(
        ["train", "--algo", "ppo", "--env-id", "CartPole-v1", "--total-env-steps",
         "2048", "--num-envs", "4", "--num-steps", "128", "--eval-every-steps",
         "1024", "--keep-checkpoints", "all", "--out", str(run)]
    )  # fmt: skip
    sizes = ["--batch-sizes", "4,8", "--num-batches", "4"]
    sizes += ["--reference-trajectories", "64", "--horizon", "64"]
    sizes += ["--estimators", "reinforce,truncated_is,ppo_clip"]  # one of each kind
    real = tmp_path / "real"
    cli.main(["variance", "--run", str(run), "--lag-checkpoints", "1", *sizes,
              "--out", str(real)])  # fmt: skip
    rows = _rows(real / "results.csv")
    assert {r["lag_checkpoints"] for r in rows} == {"1"}
    assert rows[0]["checkpoint"] == "env_steps_000000001024"
    assert rows[0]["target"] == "env_steps_000000002048"
    assert float(rows[0]["lag_kl"]) > 0
    last = run / "checkpoints" / "evaluations" / "env_steps_000000002048"
    levels = tmp_path / "levels"
    cli.main(["variance", "--checkpoints", str(last), "--lag-kl", "0,0.01", *sizes,
              "--out", str(levels)])  # fmt: skip
    rows = _rows(levels / "results.csv")
    assert {r["target"] for r in rows} == {"kl_0", "kl_0.01"}
    assert "lag_checkpoints" not in rows[0]
    meta = checkpoint.read_meta(
        levels / "lag_targets" / rows[0]["checkpoint"] / "kl_0.01"
    )
    assert meta["env_id"] == "CartPole-v1"


LAG_SUITE = ("reinforce", "ppo_clip", "grpo", "naive", "trajectory_is",
             "per_decision_is", "truncated_is", "ppo_dual_clip", "gspo", "cispo",
             "vtrace")  # fmt: skip


def _lag_figure_rows(stages=("initial", "good"), levels=(0.0, 0.01, 0.1)):
    """results.csv rows of a lag study (two batch sizes) with cosine bands
    down to -0.9."""
    rows = []
    for stage in stages:
        for i, e in enumerate(LAG_SUITE):
            for n in (4, 8):
                for k, level in enumerate(levels):
                    row = dict(checkpoint=stage, estimator=e, batch_size=n,
                               lag_level=level, lag_kl=level * 1.1 + 0.001 * k,
                               reference_norm2=2.0)  # fmt: skip
                    row["mse"], row["mse_lo"], row["mse_hi"] = 1.0 + i, 0.0, 4.0 + i
                    row["cos_true"] = 0.5 - 0.1 * k
                    row["cos_true_lo"], row["cos_true_hi"] = -0.9, 0.8
                    rows.append(row)
    return rows


def test_vs_staleness_is_in_paper_style(tmp_path):
    """STIX text kept as text, mathtext labels, a row per stage and metric, a
    column per family holding exactly its estimators, the whole cosine band."""
    from rl_pg import figures
    from rl_pg.variance import lag_report

    rows = _lag_figure_rows()
    lag_report.plot(tmp_path / "vs_staleness.png", rows, False)
    for fmt in figures.FORMATS:
        assert (tmp_path / f"vs_staleness.{fmt}").stat().st_size > 0
    svg = (tmp_path / "vs_staleness.svg").read_text()
    assert "<text" in svg and "STIX" in svg and "DejaVu Sans" not in svg
    ids = set(re.findall(r'id="series:([^"]+)"', svg))
    rescaled = {e for e in LAG_SUITE if e in figures.KNOWN_RESCALED}
    assert ids == {
        f"{s}:cos_true:{e}" for s in ("initial", "good") for e in LAG_SUITE
    } | {f"{s}:mse:{e}" for s in ("initial", "good") for e in set(LAG_SUITE) - rescaled}
    fig = figures.staleness_figure(rows, False)
    axes = np.array(fig.axes).reshape(4, -1)  # (stage x metric) x family
    families = [ax.get_legend().get_title().get_text() for ax in axes[0]]
    assert families == ["REINFORCE", "PPO / GRPO", "off-policy"]
    for ax in axes.ravel():  # each panel: only its family's estimators, one hue
        drawn = {line.get_gid().rsplit(":", 1)[1] for line in ax.get_lines()
                 if line.get_gid()}  # fmt: skip
        family = families[list(axes.ravel()).index(ax) % 3]
        assert {figures.family_of(e).name for e in drawn} <= {family}
    cosine = axes[1, 2]
    assert {line.get_gid() for line in cosine.get_lines() if line.get_gid()} == {
        f"series:initial:cos_true:{e}"
        for e in LAG_SUITE
        if figures.family_of(e).name == "off-policy"
    }
    labels = [ax.get_ylabel() for ax in axes[:, 0]] + [axes[-1, 0].get_xlabel()]
    assert all("$" in label for label in labels), labels  # mathtext
    assert axes[1, 0].get_ylim()[0] <= -0.9  # the whole cosine band
    assert axes[-1, 0].get_xticklabels()[0].get_text() == "0"  # KL 0: left edge
    figures.pyplot().close(fig)
    with_k = figures.staleness_figure(
        _lag_figure_rows(("pair",), (0.0, 0.002, 0.01)), True
    )
    assert [ax.get_ylabel().split("\n")[0] for ax in with_k.axes[::3]] == [
        "training lag",
        "training lag",
    ]
    figures.pyplot().close(with_k)


def test_rl_pg_plot_redraws_a_lag_study_without_jax(tmp_path):
    """`rl-pg plot LAG_DIR` draws vs_staleness from results.csv, JAX unloaded."""
    import subprocess
    import sys

    from rl_pg.variance import lag_report

    study = tmp_path / "lag"
    study.mkdir()
    rows = [
        {c: row.get(c, "") for c in lag_report.columns(False)}
        for row in _lag_figure_rows()
    ]
    (study / "results.csv").write_bytes(
        lag_report._csv(lag_report.columns(False), rows)
    )
    code = (
        "import sys; from rl_pg import cli; cli.main(['plot', sys.argv[1], "
        "'--estimators', 'naive,grpo', '--format', 'svg']); "
        "assert 'jax' not in sys.modules, 'jax imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(study)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    svg = (study / "vs_staleness.svg").read_text()
    ids = set(re.findall(r'id="series:([^"]+)"', svg))
    assert ids == {f"{s}:cos_true:{e}" for s in ("initial", "good")
                   for e in ("naive", "grpo")} | {
        f"{s}:mse:naive" for s in ("initial", "good")}  # fmt: skip


def _report_row(estimator, kl, n, mse, bias2, variance):
    """A results row as the lag report reads it: (value, lo, hi) triples."""
    row = {"checkpoint": "good", "estimator": estimator, "lag_kl": kl}
    row |= {"batch_size": n, "reference_norm2": 4.0}
    for name, (v, lo, hi) in {"mse": mse, "bias2": bias2, "variance": variance}.items():
        row |= {name: v, f"{name}_lo": lo, f"{name}_hi": hi}
    return row


def test_the_lag_report_names_the_best_and_where_bias_overtakes_by_hand():
    from rl_pg.variance import lag_report

    one = (1.0, 0.8, 1.2)
    rows = [  # naive: bias2 clears the variance at KL 0.1 (and 0.3), significantly
        _report_row("naive", 0.01, 8, (1.1, 1, 2), (0.1, 0, 0.2), one),
        _report_row("naive", 0.1, 8, (3.0, 2, 4), (2.0, 1.5, 3), one),
        _report_row("naive", 0.3, 8, (6.0, 5, 7), (5.0, 4, 6), one),
        # truncated_is: over the variance's upper end at 0.1, its own interval not
        _report_row("truncated_is", 0.01, 8, (2.0, 1, 3), (0.0, -1, 1), one),
        _report_row("truncated_is", 0.1, 8, (2.5, 2, 3), (1.5, 0.5, 3), one),
        _report_row("truncated_is", 0.3, 8, (2.6, 2, 3), (0.5, 0, 1), one),
        _report_row("trajectory_is", 0.01, 8, (1.5, 1, 2), (0.0, -1, 1), one),
        _report_row("trajectory_is", 0.1, 8, (2.8, 2, 3), (3.0, 0, 9), one),
        _report_row("trajectory_is", 0.3, 8, (9.0, 8, 10), (0.0, -1, 1), one),
        _report_row("naive", 0.3, 4, (0.1, 0, 1), (0.0, -1, 1), one),  # n = 4: unread
    ]
    assert lag_report.best_lines(rows, "lag_kl") == [
        "- good, KL 0.01: **naive**, relative MSE 0.275 [0.25, 0.5]",
        "- good, KL 0.1: **truncated_is**, relative MSE 0.625 [0.5, 0.75]",
        "- good, KL 0.3: **truncated_is**, relative MSE 0.65 [0.5, 0.75]",
    ]
    assert lag_report.crossover_lines(rows, "lag_kl") == [
        "- good, naive: KL 0.1 (bias2 2 [1.5, 3] > variance 1 [0.8, 1.2], "
        "significantly)",
        "- good, truncated_is: KL 0.1 (bias2 1.5 [0.5, 3] > variance 1 [0.8, 1.2], "
        "intervals overlap)",
    ]  # trajectory_is is unbiased under lag: not listed
