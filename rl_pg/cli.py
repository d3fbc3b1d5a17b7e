"""The ``rl-pg`` command line: thin wrappers around library functions."""

import argparse
import os
import sys
import time
from pathlib import Path

from rl_pg import io
from rl_pg.algos import registry

EPILOG = "Every command writes into a new directory (or file) and never overwrites one."


def _bench(args) -> None:
    from rl_pg import throughput

    num_envs = throughput.parse_ints(args.num_envs, "--num-envs")
    modes = args.modes.split(",")
    throughput.check_args(num_envs, modes, args.reference_seconds)
    out = io.new_out_dir(args.out)
    io.write_config(out, {"command": "bench", **vars(args) | {"func": None}})
    results = throughput.run_benchmark(
        num_envs=num_envs,
        modes=modes,
        reference_seconds=args.reference_seconds,
        progress=print,
    )
    throughput.write_results(results, out)
    print(throughput.markdown_table(results))
    print(f"wrote {out / 'throughput.md'} and {out / 'throughput.json'}")


def _check_render_args(args) -> Path:
    """Every check of ``rl-pg render`` before anything is loaded or compiled."""
    out = Path(args.out)
    if out.suffix.lower() != ".gif":
        raise ValueError(f"--out must name a .gif file, got {out}")
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    io.check_can_create(out)
    if args.frame_skip < 1:
        raise ValueError(f"--frame-skip must be >= 1, got {args.frame_skip}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 <= args.flap_prob <= 1.0:  # also rejects nan
        raise ValueError(f"--flap-prob must be in [0, 1], got {args.flap_prob}")
    return out


def _scripted_act(env_params, obs, state, key):
    """``rl-pg render --policy scripted``: the scripted rule (``rl_pg.scripted``)."""
    from rl_pg.scripted import scripted_action

    del obs, key
    return scripted_action(state, env_params)


def _random_act(flap_prob, obs, state, key):
    """``rl-pg render --policy random``: flap with probability ``flap_prob``."""
    import jax

    del obs, state
    return jax.random.bernoulli(key, flap_prob).astype(int)


def _render(args) -> None:
    import jax
    import jax.numpy as jnp

    from rl_pg.envs import make
    from rl_pg.envs.render import episode_frames, write_gif

    out = _check_render_args(args)
    env, params = make("FlappyBird-v0")
    if args.checkpoint:
        from rl_pg.envs import FlappyBird

        found, agent = registry.load(args.checkpoint)
        if not isinstance(agent.env, FlappyBird):
            raise ValueError(
                f"{found} acts in {agent.meta.get('env_id', 'another env')}; "
                "rl-pg render draws Flappy Bird only"
            )
        env, params = agent.env, agent.env_params
        act_fn, agent_params = agent.act_fn, agent.params
    elif args.policy == "scripted":
        act_fn, agent_params = _scripted_act, params
    else:
        act_fn, agent_params = _random_act, jnp.float32(args.flap_prob)
    # Module-level act_fns, agent params traced: one compilation per kind.
    frames = episode_frames(
        env,
        params,
        jax.random.PRNGKey(args.seed),
        act_fn,
        args.steps,
        agent_params=agent_params,
    )
    frames = frames[:: args.frame_skip]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gif(frames, out, fps=max(1, 30 // args.frame_skip), exclusive=True)
    print(f"wrote {out}: {len(frames)} frames")


def _variance(args) -> None:
    from rl_pg.variance import job, pipeline, report, stages

    if args.config:
        _check_config_rerun(args)
        variance_job = job.load(args.config)
    else:
        _check_lag_args(args)
        if args.run and args.checkpoints:
            raise ValueError("give --run or --checkpoints, not both")
        checkpoints = stages.run_checkpoints(args.run) if args.run else args.checkpoints
        variance_job = job.preset(
            args.preset or "quick",
            args.problem or "flappy",
            estimators=args.estimators,
            decompose=args.decompose,
            sizes={f: getattr(args, f) for f in VARIANCE_SIZES},
            seed=args.seed,
            checkpoints=checkpoints,
            lag_kl=args.lag_kl,
            lag_checkpoints=args.lag_checkpoints,
            **{f: getattr(args, f) for f in VARIANCE_FIELDS},
        )
    out = pipeline.run(variance_job, args.out)
    print((out / "report.md").read_text())
    names = [p.name for p in report.written_files(out)]
    print(f"wrote into {out}: {', '.join(names)}")


def _check_config_rerun(args) -> None:
    """--config reruns a saved study as it was: no option may change it."""
    fixed = VARIANCE_OVERRIDES + ("preset", "problem", "seed", "lag_kl")
    given = [f for f in fixed if getattr(args, f) is not None]
    flags = ["checkpoints", "run", "decompose", "lag_checkpoints"]
    given += [f for f in flags if getattr(args, f) not in (None, False, [])]
    if given:
        raise ValueError(
            "--config reruns a saved run as it was; drop "
            + ", ".join("--" + f.replace("_", "-") for f in given)
        )


def _check_lag_args(args) -> None:
    """--lag-checkpoints K: K >= 1, with --run and without --lag-kl."""
    if args.lag_checkpoints is None:
        return
    if args.lag_kl is not None:
        raise ValueError("give --lag-kl or --lag-checkpoints, not both")
    if args.lag_checkpoints < 1:
        raise ValueError(f"--lag-checkpoints must be >= 1, got {args.lag_checkpoints}")
    if not args.run:
        raise ValueError("--lag-checkpoints needs --run RUN_DIR")


# rl-pg variance's options that change a preset: study sizes, job fields, estimators
VARIANCE_SIZES = ("batch_sizes", "num_batches", "reference_trajectories")
VARIANCE_FIELDS = ("horizon", "group_size", "env_id", "devices")
VARIANCE_OVERRIDES = ("estimators",) + VARIANCE_SIZES + VARIANCE_FIELDS


def _path(text: str) -> str:
    """A path option's value: not empty (Path("") is the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _seed(text: str) -> int:
    """A seed: an int in [0, 2**32) (``jax.random.PRNGKey`` wraps beyond)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**32), got {text}")
    return seed


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _train(args, extra: list[str]) -> None:
    from rl_pg import train

    if args.help_config:
        print(train.config_help(args.algo))
        return
    if args.out is None:
        raise ValueError("the following arguments are required: --out")
    overrides = train.overrides_from_argv(extra)
    result = train.train_main(
        args.algo,
        args.out,
        overrides,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        log=args.log,
    )
    if result is not None:
        print(
            f"held-out median score {result['median_score']}, mean "
            f"{result['mean_score']:.1f}; results in {args.out}"
        )


def _sweep(args, extra: list[str]) -> None:
    from rl_pg.runs import overrides, sweep

    if args.help_config:
        print(overrides.config_help(args.algo))
        return
    if args.out is None:
        raise ValueError("the following arguments are required: --out")
    rows = sweep.sweep_main(
        args.algo,
        args.out,
        overrides.overrides_from_argv(extra),
        args.num_seeds,
        gif=not args.no_gif,
        log=args.log,
    )
    print(f"{len(rows)} runs; summary in {args.out}/summary.csv")


def _eval(args) -> None:
    from rl_pg import train

    result = train.eval_main(
        args.checkpoint,
        args.out,
        num_episodes=args.episodes,
        max_score=args.max_score,
        greedy=not args.sampled,
        seed=args.seed,
        gif=args.gif,
    )
    print(
        f"held-out median score {result['median_score']}, mean "
        f"{result['mean_score']:.1f} over {len(result['scores'])} levels; "
        f"wrote {args.out}/eval.json"
    )


LOG_HELP = (
    "tensorboard: also log every metrics.csv column and the hyperparameters to "
    "RUN/tensorboard/ (needs pip install 'rl_pg[viz]'; view: pip install "
    "tensorboard, then tensorboard --logdir OUT)"
)


def _plot(args) -> None:
    from rl_pg import figures

    estimators = args.estimators.split(",") if args.estimators else None
    path = figures.plot(
        args.directory, args.metric, estimators, args.format, args.out, args.figure
    )
    print(f"wrote {path}")


def _add_plot_parser(sub) -> None:
    """``rl-pg plot``: redraw a figure from a finished run's CSV files (no JAX)."""
    from rl_pg import figures

    plot = sub.add_parser(
        "plot",
        formatter_class=_Formatter,
        help="redraw a figure of a finished study, training run or sweep",
        description="Redraw a figure from the CSV files of a finished variance "
        "study, training run or sweep, without JAX: "
        + "; ".join(f"{k}: {v}" for k, v in figures.REDRAWN.items())
        + ". Writes a new PNG, PDF or SVG file.",
    )
    plot.add_argument(
        "directory",
        metavar="RESULTS_DIR",
        help="a study's, training run's or sweep's output directory",
    )
    plot.add_argument(
        "--figure",
        choices=list(figures.REDRAWN),
        help="which figure (default: batch_size for a study, learning_curve for "
        "a run or sweep)",
    )
    plot.add_argument(
        "--metric",
        help="batch_size: rel_variance (default), variance, mse, bias2, snr, "
        "cos_true, cos_pairwise, cos_mean; along_training: one of those (default "
        "cos_true, snr and rel_variance); learning_curve: score (default) or a "
        "metrics.csv column",
    )
    plot.add_argument(
        "--estimators", help="comma-separated estimators (a study's figures)"
    )
    plot.add_argument(
        "--format",
        choices=["png", "pdf", "svg"],
        help="file format (default: --out's suffix, else pdf)",
    )
    plot.add_argument(
        "--out",
        type=_path,
        help="file to create (default: in RESULTS_DIR, named after the figure, "
        "with _redrawn added where the run already holds that file; never "
        "overwritten)",
    )
    plot.set_defaults(func=_plot)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help, unless the help already
    speaks of its default or there is none to show (None, or an off flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _command(sub, name: str, func, *, help: str, description: str):
    """A subcommand parser that runs ``func``, in the common style."""
    parser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.set_defaults(func=func)
    return parser


def _add_bench(sub) -> None:
    bench = _command(
        sub,
        "bench",
        _bench,
        help="environment throughput vs gymnax CartPole and flappy-bird-gymnasium",
        description="Env steps per second of FlappyBird (features, LIDAR, pixels) in "
        "jit(scan(vmap(step))) with random actions, side by side in the same run with "
        "gymnax CartPole-v1 and flappy-bird-gymnasium stepped in Python. Writes "
        "DIR/throughput.json and DIR/throughput.md.",
    )
    sizes = bench.add_argument_group("sizes")
    sizes.add_argument(
        "--num-envs",
        default="1,64,1024,16384,65536",
        help="comma-separated batch sizes",
    )
    sizes.add_argument(
        "--modes",
        default="features,lidar,pixels",
        help="comma-separated observation modes",
    )
    sizes.add_argument(
        "--reference-seconds",
        type=float,
        default=2.0,
        help="seconds to time the Python reference per mode",
    )
    outputs = bench.add_argument_group("outputs")
    outputs.add_argument(
        "--out", type=_path, required=True, help="new output directory"
    )


def _add_variance_inputs(group) -> None:
    """``rl-pg variance``'s policies, problem and estimators."""
    group.add_argument(
        "--preset",
        choices=VARIANCE_PRESETS,
        default=None,
        help="quick (default): about a minute on a 2-core CPU; full: research-grade; "
        "lag: the policy-lag study of the shipped policies at KL 0,0.003,0.01,0.03,0.1 "
        "(under 3 minutes)",
    )
    group.add_argument(
        "--checkpoints",
        type=_path,
        nargs="+",
        help="policy checkpoint directories, or training run directories (their "
        "best policy) (default: the shipped initial, partial and good policies); "
        "estimators that read a critic are left out for a policy without one",
    )
    group.add_argument(
        "--run",
        type=_path,
        help="a training run trained with --keep-checkpoints all: study every kept "
        "policy in training order and plot along_training.png/.pdf/.svg",
    )
    group.add_argument(
        "--config",
        type=_path,
        help="a previous run's config.json: run it again as it was",
    )
    group.add_argument("--seed", type=_seed, default=None, help="default 0")
    group.add_argument(
        "--lag-kl",
        help="policy-lag study: comma-separated KL(mu || pi) levels, e.g. "
        "0,0.003,0.01,0.03,0.1; each stage is the behaviour mu, targets move along "
        "PPO's first-epoch update direction until each KL is reached (saved under "
        "lag_targets/); estimators on mu's data, truth at the target",
    )
    group.add_argument(
        "--lag-checkpoints",
        type=int,
        help="policy-lag study on real training lag (with --run): behaviour "
        "checkpoint t, target checkpoint t + K",
    )
    group.add_argument(
        "--problem",
        choices=["flappy", "enumerable"],
        default=None,
        help="flappy: Flappy Bird policies; enumerable: the exactly solvable MDP, "
        "with exact_bias2 and exact_variance columns (the benchmark's calibration)",
    )
    group.add_argument(
        "--estimators",
        help="comma-separated registered estimator names and/or module:function "
        "loss functions (importable from the current directory or PYTHONPATH); "
        "default: every registered estimator",
    )
    group.add_argument(
        "--env-id",
        help="FlappyBird-v0, -lidar-v0 or -pixels-v0 (checked against the "
        "checkpoints; without checkpoints a freshly initialised policy)",
    )


def _add_variance_sizes(group) -> None:
    """``rl-pg variance``'s sizes (None: the preset's)."""
    group.add_argument("--batch-sizes", type=_int_list, help="e.g. 4,16,64")
    group.add_argument(
        "--num-batches", type=int, help="top-level batches (4 to 16,384)"
    )
    group.add_argument(
        "--reference-trajectories",
        type=int,
        help="trajectories in the reference estimate of the true gradient "
        "(default: the preset's)",
    )
    group.add_argument("--horizon", type=int, help="steps per episode")
    group.add_argument("--group-size", type=int, help="episodes per level (G)")


VARIANCE_PRESETS = ("quick", "full", "lag")
_NONE = type(None)
# What ``rl-pg variance --config`` reads from a run's config.json: key -> types.
_VARIANCE_CONFIG_KEYS = {
    "preset": (str,),
    "seed": (int,),
    "study": (dict,),
    "problem": (str,),
    "checkpoints": (list, _NONE),
    "horizon": (int, _NONE),
    "group_size": (int, _NONE),
    "env_id": (str, _NONE),
    "devices": (str, int, _NONE),
}
_TYPE_NAMES = {str: "a string", int: "an int", dict: "an object", list: "a list"}
_TYPE_NAMES[_NONE] = "null"


def check_variance_config(path: str | Path) -> dict:
    """The JSON object of a variance run's ``config.json`` (``--config``), checked
    for the keys and value types that a rerun reads.

    Raises:
      ValueError: one line naming the file and its first problem (missing file,
        not JSON, not an object, a missing key, a value of the wrong type).
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path} is not JSON ({error})") from None
    what = "a variance run's config.json"
    if not isinstance(saved, dict):
        raise ValueError(
            f"--config {path} must hold a JSON object ({what}), "
            f"got {type(saved).__name__}"
        )
    if saved.get("command", "variance") != "variance" or "algo" in saved:
        raise ValueError(
            f"--config {path} is not {what} but a {saved.get('command', 'train')} "
            "run's (a training run is studied with --run RUN_DIR)"
        )
    for key, types in _VARIANCE_CONFIG_KEYS.items():
        if key not in saved:
            if _NONE in types or key == "problem":  # optional
                continue
            raise ValueError(
                f"--config {path} is missing {key!r} ({what} holds preset, seed "
                "and study)"
            )
        value = saved[key]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ValueError(
                f"--config {path}: {key!r} must be {expected}, got {value!r}"
            )
    if saved["preset"] not in VARIANCE_PRESETS:
        raise ValueError(
            f"--config {path}: 'preset' must be one of {', '.join(VARIANCE_PRESETS)}, "
            f"got {saved['preset']!r}"
        )
    return saved


def _check_variance_args(args) -> None:
    """Checks of ``rl-pg variance`` before the command runs (a bad --config)."""
    if args.config:
        _check_config_rerun(args)
        check_variance_config(args.config)


def _add_variance(sub) -> None:
    var = _command(
        sub,
        "variance",
        _variance,
        help="the estimator-variance benchmark (bias, variance, cosine to the true "
        "gradient)",
        description="For policies at several training stages, estimate the true "
        "policy gradient from a large sample, then draw M batches of n trajectories "
        "per batch size and measure every estimator's bias, variance, MSE, cosine "
        "to the true gradient, pairwise cosine, SNR and the scale-free cos_mean and "
        "rel_variance, with calibrated 95% intervals. Writes results.csv, slopes.csv, "
        "per_trajectory.csv, report.md, config.json, performance.json and plots.",
    )
    var.set_defaults(check=_check_variance_args)
    _add_variance_inputs(var.add_argument_group("inputs"))
    _add_variance_sizes(
        var.add_argument_group("sizes", "unset: the sizes of --preset (or --config)")
    )
    outputs = var.add_argument_group("outputs")
    outputs.add_argument(
        "--out", type=_path, required=True, help="new output directory"
    )
    outputs.add_argument(
        "--decompose",
        action="store_true",
        help="also decompose each estimator's per-step variance into state, action "
        "and trajectory parts (Tucker et al. 2018): decomposition.csv/.png",
    )
    devices = var.add_argument_group("devices")
    devices.add_argument(
        "--devices", help="shard the study over N local devices, or 'all'"
    )


def _add_algo_options(
    parser, *, what: str, config_help: str
) -> argparse._ArgumentGroup:
    """``--algo``, ``--out`` and ``--help-config`` of ``train`` and ``sweep``; the
    run group, for the command's own options."""
    run = parser.add_argument_group("run")
    run.add_argument(
        "--algo",
        required=True,
        choices=registry.NAMES,
        metavar="ALGO",
        help="the algorithm: " + ", ".join(registry.NAMES),
    )
    run.add_argument(
        "--out", type=_path, help=f"{what} (required unless --help-config)"
    )
    info = parser.add_argument_group("help")
    info.add_argument("--help-config", action="store_true", help=config_help)
    parser.set_defaults(takes_extra=True)
    return run


def _add_train(sub) -> None:
    train = _command(
        sub,
        "train",
        _train,
        help=f"train an agent ({', '.join(registry.NAMES)})",
        description="Train fully inside jit, evaluate on held-out levels and write "
        "config.json, metrics.csv, eval.json, checkpoints, learning_curve.png and "
        "agent.gif into --out. Any config field can be set as --field-name VALUE "
        "(see --help-config). --total-env-steps, --eval-every-steps and the "
        "progress bar count env steps; for reinforce and grpo (episodic batches) "
        "the live steps inside episodes, not the padding after one ended, and "
        "updates go on until the budget is reached.",
    )
    run = _add_algo_options(
        train,
        what="new run directory",
        config_help="list the config fields of --algo, what each does and its default",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out"
    )
    outputs = train.add_argument_group("outputs")
    outputs.add_argument(
        "--keep-checkpoints",
        choices=["best", "all"],
        default="best",
        help="all: also keep the policy of every evaluation, in "
        "checkpoints/evaluations/ (for rl-pg variance --run)",
    )
    outputs.add_argument("--log", choices=["tensorboard"], help=LOG_HELP)


def _add_sweep(sub) -> None:
    sweep = _command(
        sub,
        "sweep",
        _sweep,
        help="train a grid of hyperparameters x seeds in one jit(vmap)",
        description="Train every combination of the comma-separated values given "
        "to sweepable fields (--lr 1e-3,3e-4 --ent-coef 0,0.01; see --help-config), "
        "times --num-seeds seeds, side by side in one compiled program. Writes one "
        "run directory per (cell, seed), equal to the single rl-pg train run, plus "
        "summary.csv and sweep.png into --out. Other fields take one value.",
    )
    run = _add_algo_options(
        sweep,
        what="new directory",
        config_help="list the config fields of --algo, what each does and its "
        "default (sweepable ones marked)",
    )
    run.add_argument("--num-seeds", type=int, default=1, help="seeds per cell")
    outputs = sweep.add_argument_group("outputs")
    outputs.add_argument(
        "--no-gif", action="store_true", help="skip each run's agent.gif"
    )
    outputs.add_argument("--log", choices=["tensorboard"], help=LOG_HELP)


def _add_eval(sub) -> None:
    ev = _command(
        sub,
        "eval",
        _eval,
        help="evaluate a saved policy on held-out levels",
        description="Score a checkpoint (a policy checkpoint or a training run "
        "directory) on held-out levels; writes DIR2/eval.json.",
    )
    inputs = ev.add_argument_group("inputs")
    inputs.add_argument(
        "--checkpoint",
        type=_path,
        required=True,
        help="a training run directory (its best policy) or a checkpoint, of any "
        "algorithm",
    )
    inputs.add_argument(
        "--sampled",
        action="store_true",
        help="sample actions instead of taking the argmax",
    )
    inputs.add_argument("--seed", type=_seed, default=0, help="action-sampling seed")
    sizes = ev.add_argument_group("sizes")
    sizes.add_argument("--episodes", type=int, default=32, help="held-out levels")
    sizes.add_argument(
        "--max-score",
        type=int,
        default=10_000,
        help="an episode stops at this many pipes",
    )
    outputs = ev.add_argument_group("outputs")
    outputs.add_argument(
        "--out", type=_path, required=True, help="new output directory"
    )
    outputs.add_argument("--gif", action="store_true", help="also write agent.gif")


def _add_render(sub) -> None:
    render = _command(
        sub,
        "render",
        _render,
        help="write a GIF of one episode",
        description="Render one Flappy Bird episode to an animated GIF: a scripted "
        "controller, a random policy, or a trained policy from --checkpoint.",
    )
    policy = render.add_argument_group("policy")
    policy.add_argument(
        "--policy",
        choices=["scripted", "random"],
        default="scripted",
        help="the controller when no --checkpoint is given",
    )
    policy.add_argument(
        "--checkpoint",
        type=_path,
        help="a trained policy: a training run directory or a policy checkpoint",
    )
    policy.add_argument(
        "--flap-prob",
        type=float,
        default=0.1,
        help="flap probability of the random policy",
    )
    policy.add_argument("--seed", type=_seed, default=0, help="level and policy seed")
    sizes = render.add_argument_group("sizes")
    sizes.add_argument("--steps", type=int, default=600, help="maximum steps")
    sizes.add_argument(
        "--frame-skip", type=int, default=2, help="keep every k-th frame (smaller GIFs)"
    )
    outputs = render.add_argument_group("outputs")
    outputs.add_argument("--out", type=_path, required=True, help="GIF file to create")


COMMANDS = (
    _add_bench,
    _add_variance,
    _add_train,
    _add_sweep,
    _add_eval,
    _add_render,
    _add_plot_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``rl-pg`` parser: one builder per subcommand (:data:`COMMANDS`).

    Building it imports no JAX (``rl-pg --help`` is instant); each command
    imports what it needs when it runs.
    """
    parser = argparse.ArgumentParser(
        prog="rl-pg",
        description="rl_pg: policy-gradient estimators on a jittable Flappy Bird.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None, *, cpu_cores: bool = False) -> None:
    """Run one command (``argv`` None: ``sys.argv[1:]``).

    With ``cpu_cores`` (what the ``rl-pg`` command does, see :func:`console`),
    ``rl-pg variance`` without ``--devices`` first gives the CPU backend one
    device per core (:func:`rl_pg.distributed.use_cpu_cores`), so the study's
    reference chunks run concurrently with the same numbers. It restarts the
    backend, so it is off by default: called from Python, the process is left as
    it is.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if cpu_cores and args.command == "variance" and not _mesh_requested(args):
        from rl_pg import distributed

        distributed.use_cpu_cores()
    start = time.perf_counter()
    try:
        if getattr(args, "check", None):
            args.check(args)
        if getattr(args, "takes_extra", False):
            args.func(args, extra)
        else:
            args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, what to run next, exit 130
        with io.ctrl_c_ignored():  # pressed again: the line is still written
            hint = _recovery(args, argv, None)
            print(f"rl-pg {args.command}: interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # `rl-pg ... | head` closed stdout: no error line
        hint = _recovery(args, argv, None)
        if hint:  # a training run left behind: say how to resume it
            print(f"rl-pg {args.command}: stdout was closed{hint}", file=sys.stderr)
        raise SystemExit(141) from None
    except (ValueError, OSError, ImportError) as error:  # bad input, files, extras
        message = _one_line(error)
        hint = _recovery(args, argv, error)
        print(f"rl-pg {args.command}: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:  # a bug: its traceback, then what to run next
        hint = _recovery(args, argv, error)
        if hint:
            print(f"rl-pg {args.command}: failed{hint}", file=sys.stderr)
        raise
    try:
        print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    except BrokenPipeError:
        raise SystemExit(141) from None


def _one_line(error: BaseException) -> str:
    """The error's message on one line; a system call's OSError as "what: path"
    (Python's "[Errno 2] No such file or directory: '/proc/x'" reads as a bug)."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        target = f" -> {error.filename2}" if error.filename2 else ""  # a rename
        return f"{error.strerror}: {error.filename}{target}"
    return " ".join(str(error).split())


def _recovery(args, argv: list[str], error: BaseException | None) -> str:
    """``rl-pg train``: the run directory left behind and the command to run
    (``rl_pg.runs.commands.recovery_hint``); ``rl-pg sweep`` stopped after
    training: what it kept (``rl_pg.runs.sweep.trained_runs_hint``); other
    commands: ``""``."""
    if args.command == "sweep" and args.out:
        if isinstance(error, (ValueError, FileExistsError, ImportError)):
            return ""  # bad input, before training (the refusal of --out says it)
        from rl_pg.runs import sweep

        return sweep.trained_runs_hint(args.out)
    if args.command != "train" or not args.out or args.help_config:
        return ""
    from rl_pg.runs import commands

    return commands.recovery_hint(args.out, argv, error, args.keep_checkpoints)


def _mesh_requested(args) -> bool:
    """Whether ``rl-pg variance`` shards over a mesh (``--devices``, or a rerun of a
    run that did): its device count is the user's, so the backend is left alone."""
    if args.devices:
        return True
    if args.config:
        import json

        try:
            return bool(json.loads(Path(args.config).read_text()).get("devices"))
        except (OSError, ValueError, AttributeError):
            return True  # the rerun itself reports what is wrong with the file
    return False


def console() -> None:
    """The ``rl-pg`` command (and ``python -m rl_pg.cli``).

    After Ctrl-C (exit 130, its line written, its files removed or kept) the
    process ends at once: XLA may still be compiling on its own threads, and the
    interpreter's teardown beside them segfaulted now and then (exit 139)."""
    try:
        main(cpu_cores=True)
    except SystemExit as stop:
        if stop.code == 141:  # stdout's reader is gone: nothing is left to flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if stop.code != 130:
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    console()
