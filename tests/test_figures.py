"""Paper figures from CSV files (rl_pg.figures) and ``rl-pg plot``."""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from rl_pg import cli, figures

METRICS = (
    "bias2",
    "variance",
    "mse",
    "cos_true",
    "cos_pairwise",
    "snr",
    "cos_mean",
    "rel_variance",
)
ESTIMATORS = (
    "reinforce",
    "reward_to_go",
    "constant_baseline",
    "mean_baseline",
    "rloo",
    "optimal_baseline",
    "optimal_baseline_per_parameter",
    "value_baseline",
    "gae",
    "ppo_clip",
    "grpo",
    "dr_grpo",
    "vtrace",
    "my_new_loss",
)


def _results(path, checkpoints=("initial", "good")):
    """A results.csv like the study's: cosines with bands down to -0.6."""
    columns = ["checkpoint", "estimator", "batch_size", "num_batches", *METRICS]
    columns += [f"{m}_{s}" for m in METRICS for s in ("lo", "hi")]
    rows = []
    for c, stage in enumerate(checkpoints):
        for i, e in enumerate(ESTIMATORS):
            for n in (4, 16, 64):
                row = dict(checkpoint=stage, estimator=e, batch_size=n, num_batches=8)
                for m in METRICS:
                    value = (
                        (0.1 + 0.05 * i) * (n / 64)
                        if "cos" in m
                        else (1 + i + c) * 100 / n
                    )
                    row[m], row[f"{m}_lo"], row[f"{m}_hi"] = value, value / 2, value * 2
                row["cos_true_lo"] = -0.6 if e == "gae" else row["cos_true"] - 0.1
                row["rel_variance_hi"] = float("inf") if e == "reinforce" else 1.0
                rows.append(row)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return figures.read_csv(path / "results.csv")


def _svg_series(path):
    return set(re.findall(r'id="series:([^"]+)"', path.read_text()))


def test_every_estimator_has_a_family_and_one_hue_per_family():
    fam = lambda n: figures.family_of(n).name
    assert fam("reinforce") == fam("reward_to_go") == "REINFORCE"
    assert fam("rloo") == fam("optimal_baseline_per_parameter") == "baselines"
    assert fam("gae") == "actor-critic" and fam("dr_grpo") == "PPO / GRPO"
    assert (
        fam("is_per_decision")
        == fam("vtrace")
        == fam("trajectory_is")
        == ("off-policy")
    )
    assert fam("ppo_dual_clip") == fam("gspo") == fam("cispo") == "PPO / GRPO"
    from rl_pg import estimators

    assert all(fam(n) != "other" for n in estimators.REGISTRY)  # no black rows
    assert fam("my_module:my_loss") == "other"
    styles = figures.series_styles(ESTIMATORS)
    hues = {s["family"]: s["color"] for s in styles.values()}
    assert len(set(hues.values())) == len(hues) == 6  # 5 families + other
    for family in hues:  # within a family: distinct line style and marker
        mine = [
            (s["linestyle"], s["marker"])
            for s in styles.values()
            if s["family"] == family
        ]
        assert len(set(mine)) == len(mine)


def test_known_rescaled_is_the_registry_s():
    from rl_pg import estimators

    registered = {n for n, s in estimators.REGISTRY.items() if s.rescaled}
    assert registered == figures.KNOWN_RESCALED


def test_cosine_limits_show_the_whole_band_within_minus_one_and_one():
    _, (lo, hi) = figures.axis_limits("cosine", [0.2, 0.9], [-0.6, 0.5], [0.5, 1.0])
    assert -1.0 <= lo < -0.6 and hi == 1.0
    _, (lo, _) = figures.axis_limits("cosine", [0.0], [-3.0], [1.0])
    assert lo == -1.0
    scale, (bottom, top) = figures.axis_limits("log", [1, 10], [0.5, -1], [2, np.inf])
    assert scale == "log" and bottom == 0.5 / 1.5 and top == 10 * 1.5
    assert figures.axis_limits("log", [-1, 10], [-2, 5], [0, 20]) == ("linear", None)


@pytest.mark.slow
def test_study_figures_write_every_format_with_every_series(tmp_path):
    rows = _results(tmp_path / "study")
    written = figures.study_figures(rows, tmp_path / "figs")
    names = {p.name for p in written}
    for stem in figures.STUDY_FIGURES:
        assert {f"{stem}.{f}" for f in figures.FORMATS} <= names
    assert all(p.stat().st_size > 0 for p in written)
    svg = tmp_path / "figs/rel_variance_vs_batch_size.svg"
    expected = {f"{c}:{e}" for c in ("initial", "good") for e in ESTIMATORS}
    assert _svg_series(svg) == expected
    text = svg.read_text()
    assert "Cov" in text and "tab20" not in text
    pdf = (tmp_path / "figs/cosine_vs_batch_size.pdf").read_bytes()
    assert pdf[:4] == b"%PDF" and b"/Type3" not in pdf  # TrueType: editable text
    assert "<text" in text  # text stays text in the SVG (svg.fonttype none)


def test_cosine_figure_shows_the_lowest_band_edge(tmp_path):
    fig = figures.study_figure(_results(tmp_path), "cos_true")
    bottoms = {ax.get_ylim()[0] for ax in fig.axes}
    assert len(bottoms) == 1 and -1.0 <= bottoms.pop() <= -0.6  # shared axes


def test_small_multiples_one_column_per_family(tmp_path):
    fig = figures.study_figure(_results(tmp_path, ("a", "b", "c")), "variance")
    assert len(fig.axes) == 3 * 6
    legend_titles = [
        ax.get_legend().get_title().get_text() for ax in fig.axes if ax.get_legend()
    ]
    assert legend_titles == [
        "REINFORCE",
        "baselines",
        "actor-critic",
        "PPO / GRPO",
        "off-policy",
        "other",
    ]
    ppo = [t.get_text() for t in fig.axes[3].get_legend().get_texts()]
    assert ppo == ["PPO-clip*", "GRPO*", "Dr. GRPO*"]  # another scale: marked


def test_plot_command_redraws_chosen_series_without_jax(tmp_path):
    _results(tmp_path / "study")
    out = tmp_path / "new" / "fig.svg"  # its directory is created
    code = (
        "import sys; from rl_pg import cli; cli.main(['plot', sys.argv[1], "
        "'--metric', 'cos_true', '--estimators', 'gae,reinforce', '--out', "
        "sys.argv[2]]); assert 'jax' not in sys.modules, 'jax imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "study"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _svg_series(out) == {
        f"{c}:{e}" for c in ("initial", "good") for e in ("gae", "reinforce")
    }


@pytest.mark.slow
def test_plot_command_errors_in_one_line(tmp_path, capsys):
    _results(tmp_path / "study")
    for argv, message in (
        (["--estimators", "nope"], "estimator(s) ['nope'] not in the results"),
        (["--metric", "speed"], "unknown metric 'speed'"),
        (["--out", str(tmp_path / "study/results.csv")], "--out must end in one of"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["plot", str(tmp_path / "study"), *argv])
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    first = figures.plot_study(tmp_path / "study", fmt="png")
    again = figures.plot_study(tmp_path / "study", fmt="png")  # a new name
    assert again.name == first.stem + "_redrawn.png"
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        figures.plot_study(tmp_path / "study", fmt="png", out=first)


def _metrics(run_dir, scale):
    run_dir.mkdir(parents=True)
    lines = [
        "env_steps,wall_clock_s,loss,train_score_mean,val_median,val_mean,"
        "best_median,best_env_steps"
    ]
    lines += [
        f"{s},{s / 100},{-s / 1e4},{scale * s / 1e3},{scale * s / 500},1,"
        f"{scale * s / 500},{s}"
        for s in (1000, 2000, 3000)
    ]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_plot_run_draws_a_run_and_a_sweep(tmp_path):
    _metrics(tmp_path / "run", 1)
    out = figures.plot_run(tmp_path / "run", fmt="svg")
    assert out.name == "score.svg"
    assert _svg_series(out) == {
        "val_median:run",
        "best_median:run",
        "train_score_mean:run",
    }
    fig = figures.run_figure(tmp_path / "run", "loss")
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [-0.1, -0.2, -0.3]
    sweep = tmp_path / "sweep"
    summary = ["cell,seed,lr,median_score,run_dir"]
    for cell, lr in enumerate((0.001, 0.003)):
        for seed in (0, 1):
            _metrics(sweep / f"c{cell}s{seed}", cell + 1)
            summary.append(f"{cell},{seed},{lr},1,c{cell}s{seed}")
    (sweep / "summary.csv").write_text("\n".join(summary) + "\n")
    out = figures.plot(sweep, "val_median", fmt="svg")
    assert _svg_series(out) == {
        f"lr=0.00{k}:c{c}s{s}" for c, k in ((0, 1), (1, 3)) for s in (0, 1)
    }
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        figures.run_figure(tmp_path / "run", "nope")


# ------------------------------------------------------- labels and markers


@pytest.mark.slow
def test_kept_checkpoints_are_labelled_in_steps_and_long_labels_wrap(tmp_path):
    assert figures.stage_label("env_steps_000000001600") == "1.6k steps"
    assert figures.stage_label("env_steps_000002500000") == "2.5M steps"
    assert figures.stage_label("env_steps_000000000512") == "512 steps"
    assert figures.stage_label("good") == "good"
    long = figures.stage_label("a_policy_checkpoint_with_a_long_name")
    assert all(len(line) <= 18 for line in long.splitlines()) and "\n" in long
    stages = ("env_steps_000000001600", "env_steps_000000003200")
    fig = figures.study_figure(_results(tmp_path, stages), "variance")
    rows = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert rows == ["1.6k steps", "3.2k steps"]
    figures.save(fig, tmp_path / "fig.svg")
    text = (tmp_path / "fig.svg").read_text()
    shown = re.findall(r"<text[^>]*>([^<]*)</text>", text)  # ids keep the label
    assert "1.6k steps" in shown and not any("env_steps" in t for t in shown)
    decomposition = [
        dict(checkpoint=stage, estimator="reinforce", component=c, variance=1.0,
             variance_lo=0.5, variance_hi=2.0)
        for stage in stages
        for c in ("state", "action", "trajectory", "total")
    ]  # fmt: skip
    fig = figures.decomposition_figure(decomposition)
    assert [ax.get_title() for ax in fig.axes] == ["1.6k steps", "3.2k steps"]
    close = ("env_steps_000100200000", "env_steps_000100400000", stages[0])
    assert list(figures.stage_titles(close).values()) == [
        "100.2M steps", "100.4M steps", "1.6k steps"
    ]  # fmt: skip
    fig = figures.study_figure(_results(tmp_path / "close", close), "variance")
    rows = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert rows == ["100.2M steps", "100.4M steps", "1.6k steps"]
    fig = figures.decomposition_figure(
        [dict(row, checkpoint=close[stages.index(row["checkpoint"])])
         for row in decomposition] + decomposition[:4]
    )  # fmt: skip
    assert [ax.get_title() for ax in fig.axes] == [
        "100.2M steps",
        "100.4M steps",
        "1.6k steps",
    ]


def test_a_single_evaluation_is_drawn_as_a_marker(tmp_path):
    rows = [dict(env_steps=1000, val_median=3, best_median=3, train_score_mean=1)]
    fig = figures.learning_curve_figure(rows)
    assert all(line.get_marker() not in (None, "None") for line in fig.axes[0].lines)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "env_steps,val_median,best_median,train_score_mean\n1000,3,3,1\n"
    )
    fig = figures.run_figure(run)
    assert all(line.get_marker() not in (None, "None") for line in fig.axes[0].lines)
    _metrics(tmp_path / "long", 1)  # three evaluations: lines without markers
    fig = figures.run_figure(tmp_path / "long")
    assert all(line.get_marker() in (None, "None") for line in fig.axes[0].lines)


# ------------------------------------------------------ rl-pg plot --figure


def _study_dir(path):
    """A finished study of two kept checkpoints: results.csv, config.json (their
    env steps) and decomposition.csv."""
    stages = ("env_steps_000000001600", "env_steps_000000003200")
    _results(path, stages)
    config = {"stages": {s: {"env_steps": int(s[-12:])} for s in stages}}
    (path / "config.json").write_text(json.dumps(config))
    lines = ["checkpoint,estimator,component,variance,variance_lo,variance_hi"]
    lines += [
        f"{s},{e},{c},{1 + k},{0.5 + k},{2 + k}"
        for s in stages
        for k, e in enumerate(("reinforce", "gae", "value_baseline"))
        for c in ("state", "action", "trajectory", "total")
    ]
    (path / "decomposition.csv").write_text("\n".join(lines) + "\n")


def _sweep_dir(path):
    """A finished sweep: summary.csv and aggregate.csv of two cells x 4 seeds."""
    path.mkdir(parents=True)
    summary = ["cell,seed,lr,median_score,run_dir"]
    summary += [
        f"{c},{k},{lr},{score},c{c}s{k}"
        for c, (lr, scores) in enumerate(
            ((0.001, (0, 2, 4, 6)), (0.003, (1, 9, 9, 30)))
        )
        for k, score in enumerate(scores)
    ]
    (path / "summary.csv").write_text("\n".join(summary) + "\n")
    aggregate = ["cell,lr,label,num_runs,iqm,iqm_lo,iqm_hi,median,median_lo,median_hi"]
    aggregate += [
        "0,0.001,lr=0.001,4,3,1,5,3,1,5",
        "1,0.003,lr=0.003,4,9,5,19.5,9,5,19.5",
    ]
    (path / "aggregate.csv").write_text("\n".join(aggregate) + "\n")
    (path / "config.json").write_text(json.dumps({"algo": "ppo"}))


@pytest.mark.slow
def test_plot_redraws_along_training_decomposition_sweep_and_profiles(tmp_path):
    _study_dir(tmp_path / "study")
    _sweep_dir(tmp_path / "sweep")
    drawn = {}
    for directory, figure, extra in (
        ("study", "along_training", ["--estimators", "gae,rloo"]),
        ("study", "decomposition", ["--estimators", "gae,reinforce"]),
        ("sweep", "sweep", []),
        ("sweep", "performance_profile", []),
    ):
        out = tmp_path / f"{figure}.svg"
        cli.main(["plot", str(tmp_path / directory), "--figure", figure,
                  "--out", str(out), *extra])  # fmt: skip
        drawn[figure] = out.read_text()
    assert _svg_series(tmp_path / "along_training.svg") == {
        f"{m}:{e}" for m in figures.ALONG_TRAINING for e in ("gae", "rloo")
    }
    text = drawn["decomposition"]
    assert "GAE" in text and "REINFORCE" in text and "value baseline" not in text
    assert "1.6k steps" in text
    assert _svg_series(tmp_path / "sweep.svg") == {
        f"{kind}:lr=0.00{k}" for kind in ("iqm", "seeds") for k in (1, 3)
    }
    assert "3 [1, 5]" in drawn["sweep"] and "9 [5, 19.5]" in drawn["sweep"]
    assert _svg_series(tmp_path / "performance_profile.svg") == {
        "profile:lr=0.001",
        "profile:lr=0.003",
    }


def test_plot_figure_errors_in_one_line(tmp_path, capsys):
    _results(tmp_path / "study")  # stages without env steps, no decomposition
    (tmp_path / "study/config.json").write_text("{}")
    _sweep_dir(tmp_path / "sweep")
    for directory, argv, message in (
        ("study", ["--figure", "along_training"], "two or more stages with env steps"),
        ("study", ["--figure", "decomposition"], "has no decomposition.csv"),
        ("study", ["--figure", "sweep"], "has no summary.csv (not a sweep)"),
        ("sweep", ["--figure", "sweep", "--metric", "loss"], "--metric does not apply"),
        ("sweep", ["--estimators", "gae"], "--estimators applies to a variance study"),
        ("study", ["--figure", "vs_staleness"], "draws a lag study (rl-pg variance"),
        ("study", ["--figure", "learning_curve"], "is a variance study (results.csv)"),
        ("study", ["--out", str(tmp_path / "x.png")], "and --format svg disagree"),
    ):
        with pytest.raises(SystemExit):
            cli.main(["plot", str(tmp_path / directory), *argv, "--format", "svg"])
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_sweep_figure_draws_each_cell_s_iqm_interval_and_seeds():
    scores = {"lr=0.001": [0.0, 2.0, 4.0, 6.0], "lr=0.003": [1.0, 9.0, 9.0, 30.0]}
    stats = {
        "lr=0.001": dict(iqm=3.0, iqm_lo=1.0, iqm_hi=5.0),
        "lr=0.003": dict(iqm=9.0, iqm_lo=5.0, iqm_hi=19.5),
    }
    ax = figures.sweep_figure(scores, stats).axes[0]
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    assert list(lines["series:iqm:lr=0.001"].get_xdata()) == [3.0]
    assert list(lines["series:iqm:lr=0.003"].get_xdata()) == [9.0]
    assert list(lines["series:seeds:lr=0.003"].get_xdata()) == scores["lr=0.003"]
    # the first cell on top
    assert [t.get_text() for t in ax.get_yticklabels()] == ["lr=0.001", "lr=0.003"]
    assert ax.get_yticks()[0] > ax.get_yticks()[1]
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] < 0


def test_plot_without_out_never_overwrites_the_run_s_own_figure(tmp_path, capsys):
    """Without --out the redraw goes beside the figure the run wrote, under a
    new name (the command that made the run wrote sweep.pdf)."""
    _sweep_dir(tmp_path / "sweep")
    own = tmp_path / "sweep" / "sweep.pdf"
    own.write_bytes(b"the sweep's own figure")
    for name in ("sweep_redrawn.pdf", "sweep_redrawn_2.pdf"):
        cli.main(["plot", str(tmp_path / "sweep"), "--figure", "sweep"])
        assert (tmp_path / "sweep" / name).read_bytes().startswith(b"%PDF"), name
    assert own.read_bytes() == b"the sweep's own figure"


def test_negative_scores_stay_on_the_axes():
    """Another env's returns (Acrobot: -500 to -60) are drawn within the axes,
    not cut to the pipes' [-0.03, 1]."""
    rows = [
        {"env_steps": s, "val_median": v, "best_median": v, "train_score_mean": v}
        for s, v in ((1000, -500.0), (2000, -200.0), (3000, -60.0))
    ]
    ax = figures.learning_curve_figure(rows).axes[0]
    low, high = ax.get_ylim()
    assert low <= -500 and high >= -60
    ax = figures.sweep_figure({"lr=0.001": [-480.0, -300.0, -90.0]}).axes[0]
    low, high = ax.get_xlim()
    assert low <= -480 and high >= -90
