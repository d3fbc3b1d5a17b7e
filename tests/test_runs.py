"""Tests for rl_pg.runs: the one driver agrees with the pure train, sweeps equal
single runs, bad sweep input fails early, value-based runs resume.

The configs are tiny (a few hundred env steps per chunk), so the tests check
agreement between code paths, not learning.
"""

import csv
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_pg import checkpoint, cli, train
from rl_pg.algos import base, dqn, ppo, qlearning, registry
from rl_pg.algos.config import hyperparameters, with_hyperparameters
from rl_pg.runs import driver, sweep

pytestmark = pytest.mark.xdist_group("runs")

TINY = {
    "num-envs": "8",
    "num-steps": "32",
    "num-minibatches": "2",
    "total-env-steps": str(8 * 32 * 6),  # 6 updates
    "eval-every-steps": str(8 * 32 * 3),  # two chunks of 3 updates: one program
    "eval-episodes": "4",
    "final-eval-episodes": "4",
    "eval-max-score": "20",
    "stop-confirm-episodes": "4",
}


def _rows(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.pop("wall_clock_s")
    return rows


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """``rl-pg sweep`` over two learning rates x two seeds on TINY, shared by the
    tests that read it (one compilation of the four-run program): cell 0 is the
    default config (lr 1e-3, ent-coef 0.01), cell 1 has lr 3e-3; TensorBoard logs
    in every run directory."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    cli.main(
        ["sweep", "--algo", "ppo", "--out", str(out), "--num-seeds", "2", "--no-gif"]
        + [x for k, v in TINY.items() for x in (f"--{k}", v)]
        + ["--lr", "1e-3,3e-3", "--ent-coef", "0.01", "--log", "tensorboard"]
    )
    return out


# ------------------------------------------------------------------ hyperparameters


def test_hyperparameters_are_traced_and_reach_the_update():
    config = ppo.PPOConfig()
    hparams = hyperparameters(config)
    assert set(hparams) == set(ppo.PPOConfig.SWEEPABLE) >= {"lr", "ent_coef", "gamma"}
    assert hparams["lr"].dtype == jnp.float32 and hparams["lr"] == np.float32(config.lr)
    traced = with_hyperparameters(config, {"lr": jnp.float32(0.5)})
    assert traced.lr == 0.5 and config.lr == 1e-3 and traced.num_envs == 64
    with pytest.raises(ValueError, match="not sweepable"):
        with_hyperparameters(config, {"num_envs": 3})


@pytest.mark.slow
def test_the_learning_rate_is_a_traced_argument_of_one_compilation():
    config = train.make_config("ppo", TINY)
    key = jax.random.PRNGKey(0)
    traces = []

    def init_and_step(hparams):
        traces.append(1)
        algorithm = ppo.ALGORITHM
        run = base.init_run(algorithm, config, hparams, key)
        state, _ = algorithm.steps(with_hyperparameters(config, hparams), run.train, 1)
        return state.params

    step = jax.jit(init_and_step)
    fast = step({**hyperparameters(config), "lr": jnp.float32(1e-2)})
    slow = step({**hyperparameters(config), "lr": jnp.float32(1e-5)})
    zero = step({**hyperparameters(config), "lr": jnp.float32(0.0)})
    assert len(traces) == 1  # one compilation for three learning rates
    start = base.init_run(ppo.ALGORITHM, config, hyperparameters(config), key)

    def moved(params):
        diffs = jax.tree.map(
            lambda a, b: jnp.max(jnp.abs(a - b)), params, start.train.params
        )
        return max(float(d) for d in jax.tree.leaves(diffs))

    assert moved(zero) == 0.0  # lr 0: Adam does not move
    assert moved(fast) > 10 * moved(slow) > 0


# ------------------------------------------------------------------ the driver


def _assert_rows_agree(rows, expected):
    """Counts, scores and env steps equal; float diagnostics equal up to the
    rounding of batched vs unbatched XLA kernels (different programs)."""
    assert len(rows) == len(expected)
    for row, other in zip(rows, expected, strict=True):
        assert row.keys() == other.keys()
        for key, value in row.items():
            if key in _EXACT_COLUMNS:
                assert float(value) == float(other[key]), key
            else:
                np.testing.assert_allclose(
                    float(value), float(other[key]), rtol=1e-4, atol=1e-6, err_msg=key
                )


_EXACT_COLUMNS = (
    "env_steps",
    "update",
    "live_env_steps",
    "train_episodes",
    "train_score_max",
    "val_median",
    "val_mean",
    "best_median",
    "best_env_steps",
)


def _assert_run_is(run_dir, runs, outs, i):
    """Run directory ``run_dir`` holds exactly member ``i`` of a vmapped train:
    every metrics.csv column the train returns, the best checkpoint bit for bit
    and the held-out scores of those parameters."""
    rows = _rows(run_dir / "metrics.csv")
    assert [int(r["update"]) for r in rows] == [3, 6]
    columns = {
        "env_steps": outs.env_steps,
        "val_median": outs.val_median,
        "val_mean": outs.val_mean,
        "best_median": outs.best_median,
        "best_env_steps": outs.best_env_steps,
        **{k: v for k, v in outs.metrics.items() if k in rows[0]},
    }
    assert "loss" in columns and "grad_norm" in columns
    for name, values in columns.items():
        assert [float(r[name]) for r in rows] == [float(v) for v in values[i]], name
    best = driver.pick(runs.best_params, i)
    _, saved, *_ = checkpoint.load_policy(run_dir / "checkpoints" / "best")
    jax.tree.map(np.testing.assert_array_equal, saved, best)
    held_out = base.held_out(ppo.ALGORITHM, train.make_config("ppo", TINY), best)
    saved_eval = json.loads((run_dir / "eval.json").read_text())
    assert saved_eval["scores"] == [int(s) for s in held_out.scores]
    assert saved_eval["env_steps"] == int(runs.best_env_steps[i])


@pytest.mark.slow
def test_the_cli_reports_bit_for_bit_what_the_vmapped_train_computes(swept, tmp_path):
    """``rl-pg sweep --num-seeds 2`` (seeds 0 and 1 of each of two learning
    rates, four runs in one program) reports for its default cell exactly what
    ``jit(vmap(train))`` over seeds 0, 1, 2 returns for them, and ``rl-pg train
    --seed 0`` exactly what it returns over seed 0 alone. (XLA compiles a batch of
    one as another program than a batch of two or more: those agree only up to
    float rounding, as checked for each of the three seeds, hence the two cases.)"""
    config = train.make_config("ppo", TINY)
    saved = json.loads((swept / "cell_000_seed_0" / "config.json").read_text())
    assert saved["config"]["lr"] == config.lr  # cell 0 is the default config
    assert saved["config"]["ent_coef"] == config.ent_coef
    vmapped = jax.jit(jax.vmap(ppo.train, in_axes=(None, 0, None)))

    def user(seeds):
        keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
        return vmapped(config, keys, hyperparameters(config))

    three = user([0, 1, 2])
    assert three[1].val_median.shape == (3, 2)  # two chunks of 3 updates
    for i in (0, 1):
        _assert_run_is(swept / f"cell_000_seed_{i}", *three, i)
    # vmap over seeds equals each seed trained alone (up to float rounding)
    alone = [user([i]) for i in (0, 1, 2)]
    for i, one in enumerate(alone):
        for a, b in zip(jax.tree.leaves(three), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(a[i], b[0], rtol=2e-4, atol=2e-6)
    runs, outs = alone[0]
    single = tmp_path / "seed_0"
    train.train_main("ppo", single, {**TINY, "seed": "0"}, False, False)
    _assert_run_is(single, runs, outs, 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        dqn.DQNConfig(
            total_env_steps=4096,
            eval_every_steps=2048,
            num_envs=8,
            batch_size=32,
            buffer_size=2048,
            learning_starts=256,
            eval_episodes=4,
            final_eval_episodes=4,
            eval_max_score=20,
        ),
        qlearning.QLearningConfig(
            total_env_steps=4096,
            eval_every_steps=2048,
            num_envs=8,
            eval_episodes=4,
            final_eval_episodes=4,
            eval_max_score=20,
        ),
    ],
    ids=["dqn", "qlearning"],
)
def test_a_seed_trains_bit_for_bit_the_same_beside_any_other_seeds(config):
    """Value-based runs too: seeds 0 and 1 of ``jit(vmap(train))`` over two seeds
    equal them over three, every ChunkOut field and the best parameters."""
    train = base.make_train(registry.of(config))
    train_fn = jax.jit(jax.vmap(train, in_axes=(None, 0, None)))

    def over(seeds):
        keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
        return train_fn(config, keys, hyperparameters(config))

    two, three = over([0, 1]), over([0, 1, 2])
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(three), strict=True):
        np.testing.assert_array_equal(a, b[:2])
    assert len(jax.tree.leaves(two[1].metrics)) >= 4


@pytest.mark.slow
def test_chunk_sizes_end_with_the_remainder_and_train_runs_each_group(tmp_path):
    """A budget that is not a multiple of the evaluation interval ends with a
    shorter chunk (TINY above has none, so that its runs compile one chunk
    program); ``train`` scans each group of equal chunks and concatenates their
    outputs in order, and the driver runs each chunk at its own size (checked
    on Q-learning, cheap to compile, with three chunk sizes forced)."""
    six = train.make_config("ppo", {**TINY, "eval-every-steps": str(8 * 32 * 4)})
    assert ppo.ALGORITHM.chunk_sizes(six) == (4, 2)
    assert ppo.ALGORITHM.chunk_sizes(train.make_config("ppo", TINY)) == (3, 3)
    assert base._runs_of((8, 8, 8, 3)) == [(8, 3), (3, 1)]
    assert base._runs_of((4, 2, 2, 4)) == [(4, 1), (2, 2), (4, 1)]
    config = qlearning.QLearningConfig(
        total_env_steps=4096, eval_every_steps=2048, num_envs=8, eval_episodes=4,
        final_eval_episodes=4, eval_max_score=20,
    )  # fmt: skip
    algorithm = qlearning.ALGORITHM._replace(chunk_sizes=lambda c: (64, 64, 32, 16))
    run, out = jax.jit(base.train, static_argnums=(0, 1))(
        algorithm, config, jax.random.PRNGKey(0)
    )
    assert out.env_steps.tolist() == [8 * 64, 8 * 128, 8 * 160, 8 * 176]
    assert int(run.evals) == 4 and int(algorithm.env_steps(run.train)) == 8 * 176
    member = driver.Member(algorithm, config, tmp_path)
    member.ckpt_dir.mkdir()
    batch = driver.Batch.of([member])
    runs, completed = driver.train_batch(batch, batch.init())
    assert completed and [r["env_steps"] for r in member.rows] == out.env_steps.tolist()
    np.testing.assert_allclose(
        driver.pick(runs, 0).best_params, run.best_params, rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_a_stopped_run_stops_changing_inside_jit():
    config = train.make_config("ppo", {**TINY, "stop-at-score": "1"})
    unconfirmed = train.make_config(
        "ppo", {**TINY, "stop-at-score": "1", "stop-confirm-episodes": "0"}
    )
    hparams = hyperparameters(config)
    run = base.init_run(ppo.ALGORITHM, config, hparams, jax.random.PRNGKey(0))
    chunk = jax.jit(base.run_chunk, static_argnums=(0, 1, 4))
    # An untrained policy scores 0: neither rule stops it.
    after, out = chunk(ppo.ALGORITHM, config, hparams, run, 1)
    assert not out.stopped and int(after.evals) == 1 and int(out.env_steps) == 256
    # A best median at the target stops the unconfirmed rule, not the confirmed
    # one (the current policy must reach it on fresh levels).
    lucky = run._replace(best_median=jnp.float32(1.0), best_mean=jnp.float32(9.0))
    after, out = chunk(ppo.ALGORITHM, unconfirmed, hparams, lucky, 1)
    assert out.stopped and int(after.evals) == 1 and float(out.best_median) == 1.0
    _, out = chunk(ppo.ALGORITHM, config, hparams, lucky, 1)
    assert not out.stopped
    # Once stopped, a chunk returns the state unchanged.
    again, out = chunk(ppo.ALGORITHM, unconfirmed, hparams, after, 1)
    jax.tree.map(np.testing.assert_array_equal, again, after)
    assert out.stopped and int(out.env_steps) == 256


@pytest.mark.slow
def test_a_qlearning_run_resumes_to_the_same_table(tmp_path):
    config = qlearning.QLearningConfig(
        num_envs=16,
        total_env_steps=3 * 8_000,
        eval_every_steps=8_000,
        eval_episodes=4,
        eval_max_score=20,
        final_eval_episodes=4,
    )
    full = train.run(config, tmp_path / "full", progress=False, gif=False)
    part = train.run(config, tmp_path / "part", progress=False, max_evals=1)
    assert not part.completed and len(part.metrics) == 1
    done = train.run(config, tmp_path / "part", resume=True, progress=False, gif=False)
    np.testing.assert_array_equal(done.state.q, full.state.q)
    np.testing.assert_array_equal(done.best_params, full.best_params)
    assert done.eval["scores"] == full.eval["scores"]
    assert _rows(tmp_path / "part/metrics.csv") == _rows(tmp_path / "full/metrics.csv")
    assert (tmp_path / "part/checkpoints/best.npz").is_file()


# ------------------------------------------------------------------ sweeps


def test_parse_grid_splits_fixed_fields_from_the_grid():
    fixed, grid = sweep.parse_grid(
        "ppo", {"lr": "1e-3,3e-4", "num-envs": "8", "hidden": "16,16", "gamma": "0.9"}
    )
    assert fixed == {"num_envs": 8, "hidden": (16, 16)}
    assert grid == {"lr": [1e-3, 3e-4], "gamma": [0.9]}
    assert sweep.cells({"lr": [1, 2], "gamma": [3, 4]}) == [
        {"lr": 1, "gamma": 3},
        {"lr": 1, "gamma": 4},
        {"lr": 2, "gamma": 3},
        {"lr": 2, "gamma": 4},
    ]
    assert sweep.cells({}) == [{}]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no-such-field", "1,2"], "Unknown option --no-such-field"),
        (["--num-envs", "8,16"], "--num-envs is not sweepable"),
        (["--lr", ","], "--lr: empty value"),
        (["--lr", "1e-3,,3e-4"], "--lr: empty value"),
        (["--lr", "1e-3,x"], "--lr: cannot parse"),
        (["--lr", "1e-3,1e-3"], "--lr: repeated value"),
        (["--lr", "1e-3,0.0010000001"], "equal to 6 significant digits"),
        (["--lr", "1e-3,2.0"], "lr must be a number in"),
        (["--num-seeds", "0"], "--num-seeds must be an int >= 1"),
        (["--seed", "4294967295", "--num-seeds", "2"], "reach seed 4294967296"),
    ],
)
def test_bad_sweep_input_is_a_one_line_error_before_any_work(
    argv, message, tmp_path, capsys, monkeypatch
):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the input was checked")

    monkeypatch.setattr(driver, "compiled_init", no_compiling)
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", "--algo", "ppo", "--out", str(out), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.slow
def test_a_sweep_cell_equals_the_single_run(swept, tmp_path):
    out = swept
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(r["cell"], r["seed"], r["lr"]) for r in summary] == [
        ("0", "0", "0.001"),
        ("0", "1", "0.001"),
        ("1", "0", "0.003"),
        ("1", "1", "0.003"),
    ]
    for fmt in ("png", "pdf", "svg"):
        assert (out / f"sweep.{fmt}").stat().st_size > 0
    cell = out / "cell_001_seed_1"
    for name in ("config.json", "metrics.csv", "eval.json", "learning_curve.png"):
        assert (cell / name).is_file(), name
    assert (cell / "checkpoints/best/params.msgpack").is_file()
    single = tmp_path / "single"
    data = train.train_main(
        "ppo",
        single,
        {**TINY, "lr": "3e-3", "ent-coef": "0.01", "seed": "1"},
        False,
        False,
    )
    swept = json.loads((cell / "eval.json").read_text())
    assert swept["scores"] == data["scores"]
    assert swept["env_steps"] == data["env_steps"] == int(summary[3]["env_steps"])
    _assert_rows_agree(_rows(cell / "metrics.csv"), _rows(single / "metrics.csv"))
    saved = json.loads((cell / "config.json").read_text())["config"]
    assert saved["lr"] == 3e-3 and saved["seed"] == 1
    single_config = json.loads((single / "config.json").read_text())["config"]
    assert saved == single_config
    # the cells differ: another learning rate trains another policy
    other = _rows(out / "cell_000_seed_1/metrics.csv")
    assert other[0]["loss"] != _rows(cell / "metrics.csv")[0]["loss"]
    _, a, *_ = checkpoint.load_policy(cell / "checkpoints/best")
    _, b, *_ = checkpoint.load_policy(single / "checkpoints/best")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)


@pytest.mark.slow
def test_a_sweep_logs_each_run_s_metrics_csv_to_tensorboard(swept):
    """``rl-pg sweep --log tensorboard``: every run's event files hold its
    metrics.csv (each column at its env steps) and its own hyperparameters."""
    from test_outputs import read_events

    for run in sorted(swept.glob("cell_*_seed_*")):
        with open(run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        scalars, hparams = read_events(run / "tensorboard")
        assert rows and set(scalars) == set(rows[0]) - {"env_steps"}
        for column, points in scalars.items():
            assert [s for s, _ in points] == [int(r["env_steps"]) for r in rows]
            expected = np.array([float(r[column]) for r in rows], np.float32)
            np.testing.assert_array_equal(np.float32([v for _, v in points]), expected)
        config = json.loads((run / "config.json").read_text())["config"]
        assert hparams["config/lr"] == pytest.approx(config["lr"])
        assert hparams["config/seed"] == config["seed"]


@pytest.mark.slow
def test_train_log_tensorboard_matches_metrics_csv(tmp_path):
    """``rl-pg train --log tensorboard``: the events hold metrics.csv (TINY, whose
    one-run chunk program the tests above compiled: lr is traced)."""
    from test_outputs import read_events

    out = tmp_path / "run"
    argv = ["train", "--algo", "ppo", "--out", str(out), "--log", "tensorboard"]
    cli.main(
        argv + ["--lr", "2e-3"] + [x for k, v in TINY.items() for x in (f"--{k}", v)]
    )
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    scalars, hparams = read_events(out / "tensorboard")
    assert len(rows) == 2 and set(scalars) == set(rows[0]) - {"env_steps"}
    for column, points in scalars.items():
        assert [s for s, _ in points] == [int(r["env_steps"]) for r in rows]
        expected = np.array([float(r[column]) for r in rows], np.float32)
        np.testing.assert_array_equal(np.float32([v for _, v in points]), expected)
    assert hparams["config/lr"] == pytest.approx(2e-3) and hparams["algo"] == "ppo"


# ------------------------------------------------------------------ episodic budgets


@pytest.mark.slow
def test_an_episodic_budget_and_its_evaluations_count_live_env_steps(tmp_path, capsys):
    """REINFORCE's --total-env-steps and --eval-every-steps are live env steps, as
    its metrics' env_steps and the progress bar: the run updates until the budget
    is reached (it used to stop after budget / batch slots updates, a fraction of
    the budget in live steps, with evaluations as far apart). The last batch
    overshoots the budget (random birds crash alike: 100 live steps a batch):
    the bar ends at its count out of that count (it used to drop its total,
    "1.10kstep")."""
    from rl_pg.algos import reinforce

    config = reinforce.ReinforceConfig(
        num_levels=2,
        group_size=2,
        horizon=80,
        hidden=(8,),
        total_env_steps=1050,
        eval_every_steps=400,
        eval_episodes=4,
        final_eval_episodes=4,
        eval_max_score=5,
        stop_at_score=None,
    )
    batch = config.steps_per_update  # 320 slots, far fewer live steps
    result = train.run(config, tmp_path / "run", progress=True, gif=False)
    bar = capsys.readouterr().err.replace("\r", "\n").split("reinforce: ")[-1]
    count = re.match(r"\s*100%\|[^|]*\| ([0-9.]+k?)/([0-9.]+k?) \[", bar)
    assert count and count[1] == count[2], bar
    steps = [r["env_steps"] for r in result.metrics]
    assert len(steps) == 3  # evaluations at 400, 800 and the budget, 1050
    for row, target in zip(result.metrics, (400, 800, 1050), strict=True):
        assert target <= row["env_steps"] < target + batch
        assert row["live_env_steps"] == row["env_steps"]
    assert steps[-1] > config.total_env_steps  # the bar's case above
    assert result.metrics[-1]["update"] > config.num_updates  # 1050 // 320 = 3
    assert result.eval["trained_env_steps"] == steps[-1] == int(result.state.env_steps)
    config_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config_json["budget"] == "live env steps"
    # Evaluations closer than one batch: one per update, none after the budget.
    close = train.run(
        dataclasses.replace(config, eval_every_steps=10),
        tmp_path / "close",
        progress=False,
        gif=False,
    )
    updates = [r["update"] for r in close.metrics]
    assert updates == list(range(1, len(updates) + 1))
    env_steps = [r["env_steps"] for r in close.metrics]
    assert env_steps[-1] >= 1050 > env_steps[-2]
