"""TensorBoard logs of training, seed statistics with rliable, optional extras."""

import csv
import struct
import sys

import numpy as np
import pytest

from rl_pg import cli, extras
from rl_pg.runs import aggregate, sweep, tensorboard

TINY = [
    "--num-envs",
    "8",
    "--num-steps",
    "32",
    "--num-minibatches",
    "2",
    "--total-env-steps",
    "1536",
    "--eval-every-steps",
    "1024",
    "--eval-episodes",
    "4",
    "--final-eval-episodes",
    "4",
    "--eval-max-score",
    "20",
    "--stop-confirm-episodes",
    "4",
]


def read_events(logdir):
    """(scalars: tag -> [(step, value)], hparams: name -> value) of the event
    files, parsed from the TFRecords with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    scalars, hparams = {}, {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.tag == "_hparams_/session_start_info":
                    info = plugin_hparams_pb2.HParamsPluginData.FromString(
                        v.metadata.plugin_data.content
                    ).session_start_info
                    for k, x in info.hparams.items():
                        hparams[k] = x.WhichOneof("kind") and getattr(
                            x, x.WhichOneof("kind")
                        )
    return scalars, hparams


def test_tensorboard_log_holds_every_column_and_the_hparams(tmp_path):
    rows = [
        dict(env_steps=100, loss=0.5, val_median=3, best_median=3),
        dict(env_steps=250, loss=-0.25, val_median=7, best_median=7),
    ]
    log = tensorboard.TensorBoardLog(
        tmp_path, {"algo": "ppo", "config": {"lr": 3e-4, "hidden": (64, 64)}}
    )
    for row in rows:
        log.write(row)
    log.close()
    scalars, hparams = read_events(tmp_path / "tensorboard")
    assert scalars == {
        "loss": [(100, 0.5), (250, -0.25)],
        "val_median": [(100, 3.0), (250, 7.0)],
        "best_median": [(100, 3.0), (250, 7.0)],
    }
    assert hparams["algo"] == "ppo" and hparams["config/hidden"] == "(64, 64)"
    assert hparams["config/lr"] == pytest.approx(3e-4)


def test_missing_extra_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    for command in ("train", "sweep"):
        out = tmp_path / command
        with pytest.raises(SystemExit) as info:
            cli.main(
                [
                    command,
                    "--algo",
                    "ppo",
                    "--out",
                    str(out),
                    "--log",
                    "tensorboard",
                    *TINY,
                ]
            )
        assert info.value.code == 2 and not out.exists()
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "needs tensorboardX: pip install 'rl_pg[viz]'" in err
    monkeypatch.setitem(sys.modules, "rliable", None)
    with pytest.raises(extras.MissingExtraError, match=r"rl_pg\[viz\]"):
        aggregate.interval_estimates({"a": [1.0, 2.0]})
    assert sweep.seed_statistics(tmp_path, [dict(cell=0, median_score=1)], [{}]) is None
    assert capsys.readouterr().out.strip().count("\n") == 0


def test_iqm_and_median_intervals_are_rliable_s():
    from rliable import library, metrics

    scores = {
        "a": [1.0, 5.0, 9.0, 12.0, 40.0, 3.0, 7.0, 8.0],
        "b": [0.0, 0.0, 3.0, 2.0, 1.0, 4.0],
    }
    stats = aggregate.interval_estimates(scores, reps=500, seed=3)
    # IQM of 8 runs: sorted 1 3 5 7 8 9 12 40: the mean of the middle 4 (5 7 8 9);
    # the median: (7 + 8) / 2
    assert stats["a"]["iqm"] == pytest.approx(7.25)
    assert stats["a"]["median"] == pytest.approx(7.5) and stats["a"]["num_runs"] == 8
    np.random.seed(3)  # noqa: NPY002 (rliable 1.2 resamples with the global RNG)
    points, intervals = library.get_interval_estimates(
        {k: np.asarray(v)[:, None] for k, v in scores.items()},
        lambda x: np.array([metrics.aggregate_iqm(x), np.median(x)]),
        reps=500,
        random_state=np.random.RandomState(3),
    )
    for name in scores:
        (iqm_lo, med_lo), (iqm_hi, med_hi) = intervals[name]
        got = stats[name]
        assert (got["iqm_lo"], got["iqm_hi"]) == (iqm_lo, iqm_hi)
        assert (got["median_lo"], got["median_hi"]) == (med_lo, med_hi)
        assert got["iqm_lo"] <= got["iqm"] <= got["iqm_hi"]
        assert got["iqm_lo"] < got["iqm_hi"]


@pytest.mark.slow
def test_performance_profile_is_the_fraction_above_tau(tmp_path):
    scores = {"a": [0.0, 2.0, 4.0, 6.0], "b": [1.0, 1.0, 1.0, 9.0]}
    profile = aggregate.performance_profiles(scores, taus=[0.5, 3.0, 5.0], reps=200)
    np.testing.assert_allclose(profile["profiles"]["a"], [0.75, 0.5, 0.25])
    np.testing.assert_allclose(profile["profiles"]["b"], [1.0, 0.25, 0.25])
    assert (profile["lo"]["a"] <= profile["profiles"]["a"]).all()
    rows = [
        dict(cell=c, median_score=s) for c, v in enumerate(scores.values()) for s in v
    ]
    stats = sweep.seed_statistics(tmp_path, rows, [{"lr": 1e-3}, {"lr": 3e-3}])
    assert stats["lr=0.003"]["median"] == 1.0
    with open(tmp_path / "aggregate.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == ["lr=0.001", "lr=0.003"]
    assert float(table[0]["iqm"]) == pytest.approx(3.0)
    svg = (tmp_path / "performance_profile.svg").read_text()
    assert (
        'id="series:profile:lr=0.001"' in svg and 'id="series:profile:lr=0.003"' in svg
    )
    assert (tmp_path / "performance_profile.pdf").is_file()


@pytest.mark.slow
def test_compare_algorithms_reports_seed_statistics(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments/compare_algorithms.py"
    spec = importlib.util.spec_from_file_location("compare_algorithms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = [
        dict(algo="ppo", held_out_medians=[3.0, 5.0, 40.0, 7.0]),
        dict(algo="a2c", held_out_medians=[0.0, 1.0, 2.0]),
    ]
    (tmp_path / "summary.json").write_text(json.dumps({"algorithms": table}))
    stats = module.seed_statistics(tmp_path, table)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seed_statistics"] == stats and saved["algorithms"] == table
    assert stats["ppo"]["iqm"] == pytest.approx(6.0)  # mean of 5 and 7
    assert stats["a2c"]["median"] == 1.0
    svg = (tmp_path / "performance_profile.svg").read_text()
    assert 'id="series:profile:ppo"' in svg and 'id="series:profile:a2c"' in svg


@pytest.mark.slow
def test_sweep_figure_shows_each_cell_s_rliable_iqm_in_every_format(tmp_path):
    """sweep.png/.pdf/.svg: per cell the IQM over seeds with rliable's
    stratified-bootstrap interval (aggregate.interval_estimates, reused), and
    the seeds as points."""
    from rl_pg import figures

    scores = {"lr=0.001": [0.0, 2.0, 4.0, 6.0], "lr=0.003": [1.0, 9.0, 9.0, 30.0]}
    cells = [{"lr": 1e-3}, {"lr": 3e-3}]
    rows = [
        dict(cell=c, median_score=s) for c, v in enumerate(scores.values()) for s in v
    ]
    stats = sweep.seed_statistics(tmp_path, rows, cells)
    written = sweep.plot_sweep(tmp_path / "sweep.png", rows, cells, "ppo sweep", stats)
    assert sorted(p.name for p in written) == ["sweep.pdf", "sweep.png", "sweep.svg"]
    assert all(p.stat().st_size > 0 for p in written)
    svg = (tmp_path / "sweep.svg").read_text()
    for label, s in stats.items():
        assert f'id="series:iqm:{label}"' in svg and f'id="series:seeds:{label}"' in svg
        assert f"{s['iqm']:.3g} [{s['iqm_lo']:.3g}, {s['iqm_hi']:.3g}]" in svg
    assert stats["lr=0.001"]["iqm"] == pytest.approx(3.0)  # mean of 2 and 4
    fig = figures.sweep_figure(scores, stats)
    drawn = {line.get_gid(): line for line in fig.axes[0].lines}
    for label, s in stats.items():
        assert list(drawn[f"series:iqm:{label}"].get_xdata()) == [s["iqm"]]
        caps = fig.axes[0].collections  # the interval: rliable's ends
        assert any(
            np.allclose(seg[:, 0], [s["iqm_lo"], s["iqm_hi"]])
            for c in caps
            for seg in c.get_segments()
        )


def test_compare_algorithms_draws_learning_curves_in_every_format(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "experiments/compare_algorithms.py"
    spec = importlib.util.spec_from_file_location("compare_algorithms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    curves = {
        name: [
            [
                dict(env_steps=s * 1e6, train_time_s=10.0 * s, val_median=k * s + seed)
                for s in (1, 2, 3)
            ]
            for seed in (0, 1)
        ]
        for k, name in enumerate(("ppo", "a2c"))
    }
    written = module.plot(tmp_path / "learning_curves.png", curves)
    assert sorted(p.suffix for p in written) == [".pdf", ".png", ".svg"]
    svg = (tmp_path / "learning_curves.svg").read_text()
    assert 'id="series:ppo"' in svg and 'id="series:a2c"' in svg
    assert "STIXGeneral" in svg  # the paper style's serif
