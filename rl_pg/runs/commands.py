"""The CLI's training commands: ``rl-pg train``, ``rl-pg eval`` (and ``rl-pg
sweep``, :func:`rl_pg.runs.sweep.sweep_main`)."""

import json
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from rl_pg import checkpoint, io
from rl_pg import evaluate as evaluation
from rl_pg.algos import base, registry
from rl_pg.runs import driver, files, overrides


def train_main(
    algo: str,
    out_dir: str | Path,
    options: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    keep_checkpoints: str = "best",
    log: str | None = None,
) -> dict[str, Any] | None:
    """``rl-pg train --algo ALGO --out DIR [--resume] [--field value ...]``.

    Args:
      algo: a name in ``rl_pg.algos.registry``.
      out_dir: the run directory (new, or the interrupted run's with ``resume``).
      options: config fields as strings (``{"num-envs": "64"}``), see
        :func:`rl_pg.runs.overrides.overrides_from_argv`. With ``resume`` and no
        options, the config is read from ``out_dir/config.json``.
      resume: continue an interrupted run.
      progress: show a progress bar.
      keep_checkpoints: ``"best"`` or ``"all"`` (every evaluated policy; see
        :func:`rl_pg.runs.driver.run`).
      log: ``"tensorboard"``: also write TensorBoard logs (see
        :mod:`rl_pg.runs.tensorboard`).

    Returns:
      The contents of ``eval.json``.
    """
    if keep_checkpoints not in files.KEEP_CHECKPOINTS:
        raise ValueError(
            f"keep_checkpoints must be one of {files.KEEP_CHECKPOINTS}, "
            f"got {keep_checkpoints!r}"
        )
    config_path = Path(out_dir) / "config.json"
    if resume and (hint := checkpoint.sweep_hint(Path(out_dir))) is not None:
        raise ValueError(f"--resume resumes a training run, and {hint}")
    if resume and config_path.is_file():
        saved = json.loads(config_path.read_text())
        if saved.get("algo") != algo:
            raise ValueError(f"{out_dir} is a {saved.get('algo')!r} run, not {algo!r}")
        config = overrides.config_from_saved(algo, saved["config"], options)
    else:  # a new run (or one killed before it wrote its config)
        config = overrides.make_config(algo, options)
    finished = resume and (Path(out_dir) / "eval.json").is_file()
    result = driver.run(
        config,
        out_dir,
        resume=resume,
        progress=progress,
        keep_checkpoints=keep_checkpoints,
        log=log,
    ).eval  # a finished run: its config checked against the options, then read
    if finished:
        print(f"{out_dir} is a finished run (eval.json exists): left as it is")
    return result


def _load_agent(path: Path, greedy: bool) -> tuple[Path, base.Agent]:
    """The checkpoint that ``path`` names (a run directory: its best policy) and
    its agent, read by the algorithm that wrote it."""
    if not path.exists():
        raise ValueError(f"--checkpoint {path} does not exist")
    return registry.load(path, greedy)


def _check_eval_args(num_episodes: Any, max_score: Any) -> None:
    if not (isinstance(num_episodes, int) and num_episodes >= 1):
        raise ValueError(f"--episodes must be an int >= 1, got {num_episodes!r}")
    limit = evaluation.MAX_SCORE_LIMIT
    if not (isinstance(max_score, int) and 1 <= max_score <= limit):
        raise ValueError(
            f"--max-score must be an int in [1, {limit}], got {max_score!r}"
        )


def eval_main(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    num_episodes: int = 32,
    max_score: int = 10_000,
    greedy: bool = True,
    seed: int = 0,
    gif: bool = False,
) -> dict[str, Any]:
    """``rl-pg eval --checkpoint DIR --out DIR2``: held-out scores -> ``eval.json``.

    Args:
      checkpoint_dir: a checkpoint (a policy directory, a Q-table ``.npz``) or a
        training run directory (its best policy; see
        :func:`rl_pg.checkpoint.policy_dir`), of any algorithm.
      out_dir: a new (or empty) directory for ``eval.json`` (and ``agent.gif``).
      num_episodes: held-out test levels.
      max_score: an episode stops at this many pipes.
      greedy: argmax actions (else sampled, with ``seed``).
      seed: action-sampling seed (levels do not depend on it).
      gif: also render ``agent.gif``.

    Returns:
      The contents of ``eval.json`` (``wall_clock_s`` is the evaluation's own
      time; ``env_steps`` the checkpoint's training steps when it records them).
    """
    _check_eval_args(num_episodes, max_score)
    source, agent = _load_agent(Path(checkpoint_dir), greedy)
    io.check_out_dir(out_dir)
    start = time.perf_counter()
    out = io.new_out_dir(out_dir)  # only once the checkpoint has been read
    io.write_config(
        out,
        dict(
            command="eval",
            checkpoint=str(source),
            num_episodes=num_episodes,
            max_score=max_score,
            greedy=greedy,
            seed=seed,
            held_out_seed=evaluation.HELD_OUT_SEED,
        ),
    )
    result = evaluation.evaluate(
        agent.act_fn,
        agent.params,
        agent.env,
        agent.env_params,
        jax.random.PRNGKey(seed),
        num_episodes,
        max_score,
    )
    result = jax.block_until_ready(result)
    data = evaluation.write_eval_json(
        out / "eval.json",
        result,
        wall_clock_s=time.perf_counter() - start,
        env_steps=int(agent.meta.get("env_steps", 0)),
        checkpoint=str(source),
        max_score=max_score,
        held_out_seed=evaluation.HELD_OUT_SEED,
        greedy=greedy,
    )
    if gif:
        evaluation.agent_gif(
            agent.act_fn,
            agent.params,
            agent.env,
            agent.env_params,
            out / "agent.gif",
            jax.random.PRNGKey(seed),
        )
    return data


def recovery_hint(
    out_dir: str | Path,
    argv: list[str],
    error: BaseException | None = None,
    keep_checkpoints: str = "best",
) -> str:
    """What to run after ``rl-pg train --out OUT_DIR`` (``argv``) died with
    ``error`` (None: interrupted), as ``"; ..."`` to end its one-line message;
    ``""`` where ``out_dir`` holds no unfinished run.

    An unfinished run is resumable: its directory and the ``--resume`` command
    are named (options come from its ``config.json``; before that file exists,
    the command given again, which starts the run in place). A non-finite loss
    recurs on resuming: the directory is named, to be deleted.
    """
    out = Path(out_dir)
    if not out.is_dir() or (out / "eval.json").is_file():
        return ""
    names = {p.name for p in out.iterdir()}
    if "config.json" not in names and names != {io.CLAIM_FILE}:
        return ""  # not a run this command wrote
    if io.written_by(out):
        return ""  # another command's output (a sweep, a study): not a run
    if isinstance(error, driver.NonFiniteLossError):
        return (
            f"; the stopped run in {out} would stop there again if resumed: delete "
            f"it (rm -r {shlex.quote(str(out))}) or choose a new --out"
        )
    if "config.json" in names:
        argv = ["train", "--algo", _saved_algo(out, argv), "--out", str(out)]
        if keep_checkpoints != "best":
            argv += ["--keep-checkpoints", keep_checkpoints]
    command = shlex.join(
        ["rl-pg", *argv, *(() if "--resume" in argv else ["--resume"])]
    )
    return f"; the run in {out} is resumable: {command}"


def _saved_algo(out: Path, argv: list[str]) -> str:
    try:
        return str(json.loads((out / "config.json").read_text())["algo"])
    except (OSError, ValueError, KeyError, TypeError):
        return argv[argv.index("--algo") + 1] if "--algo" in argv else "ALGO"
