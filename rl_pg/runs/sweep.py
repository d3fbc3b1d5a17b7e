"""Hyperparameter sweeps: a grid x seeds trained in one ``jit(vmap(...))``.

``rl-pg sweep --algo ppo --out DIR --num-seeds 3 --lr 1e-3,3e-4 --ent-coef 0,0.01``
trains every (cell, seed) of the grid side by side through the run driver's
chunks (:mod:`rl_pg.runs.driver`): the swept fields are the config's
``SWEEPABLE`` ones, traced values, so one compilation serves the whole grid.
Each run gets its own directory, with the same files as ``rl-pg train``, bit for
bit what ``jit(vmap(train))`` returns for it on the CPU (a single ``rl-pg train``
run, a batch of one, agrees up to float rounding); ``summary.csv`` and
``sweep.png``/``.pdf``/``.svg`` (held-out median per cell, seeds as points)
sum it up; with rliable (``rl_pg[viz]``) the figure adds each cell's IQM over
seeds with its stratified-bootstrap 95% interval, and the sweep writes
``aggregate.csv``/``.md`` (IQM and median with their intervals) and
``performance_profile.png``/``.pdf``/``.svg``.
"""

import csv
import dataclasses
import itertools
import shlex
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rl_pg import io
from rl_pg.algos import config as config_lib
from rl_pg.algos import registry
from rl_pg.runs import files, overrides, tensorboard
from rl_pg.runs.driver import Batch, Member, NonFiniteLossError, pick, train_batch

SUMMARY_COLUMNS = (
    "cell",
    "seed",
    "median_score",
    "mean_score",
    "env_steps",
    "trained_env_steps",
    "wall_clock_s",
    "run_dir",
)
SUMMARY_FILE = "summary.csv"  # written last: a sweep without it did not finish


def parse_grid(
    algo: str, options: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Split ``{"lr": "1e-3,3e-4", "num-envs": "16"}`` into fixed fields and the
    grid of sweepable fields with several values.

    Raises:
      ValueError: an unknown field, an unparsable value, an empty list, or
        several values for a field that is not sweepable.
    """
    config_cls = overrides.config_class(algo)
    sweepable = config_cls.SWEEPABLE
    hints = typing.get_type_hints(config_cls)
    fixed: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    for key, text in options.items():
        name = key.lstrip("-").replace("-", "_")
        option = "--" + name.replace("_", "-")
        parts = [p.strip() for p in str(text).split(",")]
        if name not in sweepable and (
            len(parts) == 1 or typing.get_origin(hints.get(name)) is tuple
        ):
            fixed.update(overrides.parse_overrides(config_cls, {key: text}))
            continue
        if name in hints and name not in sweepable:
            raise ValueError(
                f"{option} is not sweepable (sweepable fields of {algo}: "
                f"{', '.join(sweepable)}); give it one value"
            )
        if not all(parts):
            raise ValueError(f"{option}: empty value in the list {text!r}")
        values = [overrides.parse_overrides(config_cls, {key: p})[name] for p in parts]
        if len(set(values)) != len(values):
            raise ValueError(f"{option}: repeated value in {text!r}")
        if len({f"{v:g}" for v in values}) != len(values):
            raise ValueError(
                f"{option}: values in {text!r} are equal to 6 significant digits, "
                "and a cell is named (and its runs grouped) by them: give values "
                "that differ there"
            )
        grid[name] = values
    return fixed, grid


def cells(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the last field varying fastest (one cell: no grid)."""
    names = list(grid)
    return [dict(zip(names, v, strict=True)) for v in itertools.product(*grid.values())]


def plan(
    algo: str, options: Mapping[str, str], num_seeds: int
) -> tuple[list[dict[str, Any]], list[tuple[int, int, Any]]]:
    """Every run of the sweep as ``(cell, seed, config)``, validated.

    Raises:
      ValueError: bad options (see :func:`parse_grid`) or an invalid config.
    """
    if not (isinstance(num_seeds, int) and num_seeds >= 1):
        raise ValueError(f"--num-seeds must be an int >= 1, got {num_seeds!r}")
    fixed, grid = parse_grid(algo, options)
    config_cls = overrides.config_class(algo)
    base_config = config_cls(**fixed)
    last = base_config.seed + num_seeds - 1
    if last >= config_lib.SEED_LIMIT:
        raise ValueError(
            f"--seed {base_config.seed} and --num-seeds {num_seeds} reach seed {last}: "
            "seeds are ints in [0, 2**32)"
        )
    grid_cells = cells(grid)
    runs = []
    for c, cell in enumerate(grid_cells):
        for k in range(num_seeds):
            seed = base_config.seed + k
            runs.append((c, seed, dataclasses.replace(base_config, seed=seed, **cell)))
    return grid_cells, runs


def _run_dir(out: Path, cell: int, seed: int) -> Path:
    return out / f"cell_{cell:03d}_seed_{seed}"


def sweep_main(
    algo: str,
    out_dir: str | Path,
    options: Mapping[str, str],
    num_seeds: int = 1,
    *,
    gif: bool = True,
    progress: bool = True,
    log: str | None = None,
) -> list[dict[str, Any]]:
    """``rl-pg sweep``: train the grid x seeds side by side; write one run
    directory per run, ``sweep.png/.pdf/.svg`` and ``summary.csv`` (last). Returns the
    summary rows. ``log="tensorboard"``: TensorBoard logs in every run directory.
    Every input is checked before anything is compiled or written.

    The directory is owned (:func:`rl_pg.io.owned_output`) until the runs are
    trained: a sweep that dies or is interrupted while training removes
    everything it wrote, so the same command starts again (its runs train side
    by side in one program: there is no single run to resume); one killed
    outright is named by the next command (:func:`rl_pg.io.check_owned_out`).
    After training nothing is removed: every run's policies are saved first, a
    failing figure or statistic is skipped with one line, and a Ctrl-C or error
    while the runs are evaluated leaves them named by :func:`trained_runs_hint`."""
    tensorboard.check_log(log)
    grid_cells, runs = plan(algo, options, num_seeds)
    kept = trained_runs_hint(out_dir)
    if kept:
        raise FileExistsError(
            f"{out_dir} holds a sweep that stopped after training (or is still "
            f"evaluating its runs){kept}"
        )
    io.check_owned_out(out_dir, "a sweep", SUMMARY_FILE, ("sweep",))
    algorithm = registry.get(algo)
    with io.owned_output(out_dir, "rl-pg sweep") as out:  # until trained
        io.write_config(
            out,
            dict(
                command="sweep",
                algo=algo,
                options=dict(options),
                num_seeds=num_seeds,
                cells=grid_cells,
            ),
        )
        members = [
            _member(algorithm, config, out, cell, seed, log)
            for cell, seed, config in runs
        ]
        start = time.perf_counter()
        for member in members:
            member.clock = start
        batch = Batch.of(members)
        states = _train(batch, runs, grid_cells, progress)
    # trained: from here on nothing is removed, and every run's policies are
    # saved first (seconds), before the evaluations and GIFs (minutes)
    for i, member in enumerate(members):
        member.keep(pick(states, i))
    summary = []
    for i, (member, (cell, seed, _)) in enumerate(zip(members, runs, strict=True)):
        data = member.finish(pick(states, i), gif, kept=True)
        summary.append(_summary_row(member, data, cell, seed, grid_cells[cell]))
    try:  # a figure or statistic that fails costs no trained run
        stats = seed_statistics(out, summary, grid_cells)
        plot_sweep(out / "sweep.png", summary, grid_cells, f"{algo} sweep", stats)
    except Exception as error:
        print(
            f"skipped the sweep's statistics or figures: {error} (redraw them with "
            f"rl-pg plot {out} --figure sweep)"
        )
    _write_summary(out / SUMMARY_FILE, summary, list(grid_cells[0]))
    return summary


def trained_runs_hint(out_dir: str | Path) -> str:
    """What a sweep that stopped after training (a Ctrl-C or an error while its
    runs were evaluated or drawn: no ``summary.csv``) kept in ``out_dir``, as
    ``"; ..."`` to end a one-line message; ``""`` for any other directory."""
    out = Path(out_dir)
    if not out.is_dir() or (out / SUMMARY_FILE).exists():
        return ""
    if io.written_by(out) != "sweep":
        return ""
    runs = sorted(p for p in out.glob("cell_*_seed_*") if p.is_dir())
    saved = sum(any((p / "checkpoints").glob("last*")) for p in runs)  # dir or .npz
    if not saved:
        return ""
    evaluated = sum((p / "eval.json").is_file() for p in runs)
    return (
        f"; its trained runs are kept ({saved} of {len(runs)} with their best and "
        f"last policies in cell_*/checkpoints, {evaluated} evaluated in eval.json) "
        "but summary.csv was not written: score a run with rl-pg eval --checkpoint "
        "RUN_DIR --out DIR, or, if it is not running, remove it (rm -r "
        f"{shlex.quote(str(out))}) to sweep again"
    )


def _train(batch: Batch, runs: list, grid_cells: list[dict], progress: bool):
    """The batch trained side by side; a run whose loss turns non-finite is
    named by its cell and seed (the whole sweep stops: its runs are one
    program)."""
    try:
        states, _ = train_batch(batch, batch.init(), progress=progress)
    except NonFiniteLossError as error:
        cell, seed, _ = runs[error.run]
        raise NonFiniteLossError(
            f"cell {cell} ({_label(grid_cells[cell])}), seed {seed}: non-finite "
            f"loss at update {error.update} (loss or gradient norm inf or nan); "
            "the sweep stopped and removed what it wrote: drop that value, or "
            "lower --reward-scale or --lr"
        ) from None
    return states


def _summary_row(
    member: Member, data: dict, cell: int, seed: int, values: dict
) -> dict:
    """A run's row of ``summary.csv``: its cell, seed, the cell's ``values`` and
    from its eval ``data``."""
    return dict(
        cell=cell,
        seed=seed,
        **values,
        median_score=data["median_score"],
        mean_score=data["mean_score"],
        env_steps=data["env_steps"],
        trained_env_steps=data["trained_env_steps"],
        wall_clock_s=data["wall_clock_s"],
        run_dir=member.out_dir.name,
    )


def _member(algorithm, config, out: Path, cell: int, seed: int, log) -> Member:
    """One run of the sweep: its directory, config and (optional) TensorBoard log."""
    run_dir = io.new_out_dir(_run_dir(out, cell, seed))
    io.write_config(run_dir, files.run_config(algorithm, config))
    (run_dir / "checkpoints").mkdir()
    member = Member(algorithm, config, run_dir)
    if log is not None:
        member.log = tensorboard.TensorBoardLog(
            run_dir, files.run_config(algorithm, config)
        )
    return member


def _label(cell: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in cell.items()) or "defaults"


def _scores(rows: list[dict], grid_cells: list[dict]) -> dict[str, list[float]]:
    """Cell label -> its runs' held-out median scores."""
    return {
        _label(cell): [r["median_score"] for r in rows if r["cell"] == c]
        for c, cell in enumerate(grid_cells)
    }


def seed_statistics(
    out: Path, rows: list[dict], grid_cells: list[dict]
) -> dict[str, dict] | None:
    """Per cell, the IQM and median of the runs' held-out median scores with
    95% stratified-bootstrap intervals (rliable, :mod:`rl_pg.runs.aggregate`)
    into ``aggregate.csv`` and ``aggregate.md``, and the performance profiles
    into ``performance_profile.png/.pdf/.svg``. Without rliable: one line
    saying which extra to install, and None."""
    from rl_pg import extras, figures
    from rl_pg.runs import aggregate

    scores = _scores(rows, grid_cells)
    feature = "rl-pg sweep's seed statistics"
    try:
        stats = aggregate.interval_estimates(scores, feature=feature)
        profile = aggregate.performance_profiles(scores, feature=feature)
    except extras.MissingExtraError as error:
        print(f"skipped: {error}")
        return None
    columns = ["cell", *grid_cells[0], "label", *aggregate.STAT_COLUMNS]
    table = [
        dict(cell=c, **cell, label=_label(cell), **stats[_label(cell)])
        for c, cell in enumerate(grid_cells)
    ]
    with io.atomic_path(out / "aggregate.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    io.atomic_write_text(
        out / "aggregate.md", aggregate.markdown_table(stats, "cell") + "\n"
    )
    fig = figures.profile_figure(profile)
    figures.save(fig, out / "performance_profile.png", figures.FORMATS)
    figures.pyplot().close(fig)
    return stats


def _write_summary(path: Path, rows: list[dict], names: list[str]) -> None:
    columns = ["cell", "seed", *names, *SUMMARY_COLUMNS[2:]]
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(
    path: Path,
    rows: list[dict],
    grid_cells: list[dict],
    title: str,
    stats: dict[str, dict] | None,
) -> list[Path]:
    """``sweep.png`` and its PDF and SVG (:func:`rl_pg.figures.sweep_figure`):
    per cell, the seeds' held-out median scores as points and, with ``stats``
    (:func:`seed_statistics`), their IQM with its 95% stratified-bootstrap
    interval. Returns the files written."""
    from rl_pg import figures

    fig = figures.sweep_figure(_scores(rows, grid_cells), stats, title)
    written = figures.save(fig, path, figures.FORMATS)
    figures.pyplot().close(fig)
    return written
