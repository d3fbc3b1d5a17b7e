"""Figures for papers, redrawn from a finished run's CSV files (matplotlib only).

The variance study's ``results.csv`` (:func:`plot_study`, :func:`study_figures`,
:func:`along_training_figure`) and ``decomposition.csv``, a training run's
``metrics.csv`` or a sweep's runs (:func:`plot_run`) and a sweep's seed
statistics (:func:`sweep_figure`, :func:`profile_figure`) become PNG, PDF or SVG
figures; :func:`plot` (``rl-pg plot``) redraws each of them (:data:`REDRAWN`).
Colours follow the colour-blind-safe Okabe-Ito palette (Okabe & Ito 2008; Wong
2011, Nature Methods 8:441), one hue per estimator family (:data:`FAMILIES`),
line styles and markers within a family; many estimators are drawn as small
multiples, one panel per family with shared axes.
Nothing here imports JAX: ``rl-pg plot`` works on a machine without it.
"""

import csv
import json
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rl_pg import io

FORMATS = ("png", "pdf", "svg")
# Okabe-Ito: blue, bluish green, orange, vermillion, reddish purple, black, sky blue
OKABE_ITO = (
    "#0072B2",
    "#009E73",
    "#E69F00",
    "#D55E00",
    "#CC79A7",
    "#000000",
    "#56B4E9",
)
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
REFERENCE_COLOR = "#7f7f7f"


class Family(NamedTuple):
    """Estimators drawn in one hue (and one panel of a faceted figure)."""

    name: str
    color: str
    members: tuple[str, ...]  # known names, in drawing order
    prefixes: tuple[str, ...] = ()  # other names that start so belong here


FAMILIES = (
    Family("REINFORCE", OKABE_ITO[0], ("reinforce", "reward_to_go")),
    Family(
        "baselines",
        OKABE_ITO[1],
        (
            "constant_baseline",
            "mean_baseline",
            "rloo",
            "optimal_baseline",
            "optimal_baseline_per_parameter",
            "value_baseline",
        ),
        ("optimal", "oracle"),
    ),
    Family("actor-critic", OKABE_ITO[2], ("actor_critic", "a2c", "gae")),
    # clipped or group surrogates (rescaled: not on grad J's scale)
    Family(
        "PPO / GRPO",
        OKABE_ITO[3],
        ("ppo_clip", "ppo", "ppo_dual_clip", "grpo", "dr_grpo", "gspo", "cispo"),
    ),
    # importance-weighted corrections of behaviour data (on grad J's scale)
    Family(
        "off-policy",
        OKABE_ITO[4],
        ("naive", "trajectory_is", "per_decision_is", "truncated_is", "vtrace"),
        ("is_", "truncated", "vtrace", "v_trace", "dual_clip", "off_policy"),
    ),
)
OTHER = Family("other", OKABE_ITO[5], ())
# estimators whose mean is not on grad J's scale (rl_pg.estimators' ``rescaled``;
# a test keeps the two equal): their variance is marked in the figures
KNOWN_RESCALED = frozenset(
    {"mean_baseline", "ppo_clip", "ppo_dual_clip", "grpo", "dr_grpo", "gspo", "cispo"}
)
DISPLAY = {
    "reinforce": "REINFORCE",
    "reward_to_go": "reward-to-go",
    "rloo": "RLOO",
    "optimal_baseline_per_parameter": "optimal b, per parameter",
    "gae": "GAE",
    "a2c": "A2C",
    "ppo_clip": "PPO-clip",
    "ppo_dual_clip": "dual-clip PPO",
    "trajectory_is": "trajectory IS",
    "per_decision_is": "per-decision IS",
    "truncated_is": "truncated IS",
    "ppo": "PPO",
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "vtrace": "V-trace",
    "gspo": "GSPO",
    "cispo": "CISPO",
}
# metric -> (axis label, scale: "log" if positive, "cosine" or "linear")
METRICS = {
    "rel_variance": (
        r"$\mathrm{tr}\,\mathrm{Cov}(\hat g)/\|\mathbb{E}\hat g\|^2$",
        "log",
    ),
    "variance": (r"$\mathrm{tr}\,\mathrm{Cov}(\hat g)$", "log"),
    "mse": (r"$\mathbb{E}\|\hat g - g\|^2$", "log"),
    "bias2": (r"$\|\mathbb{E}\hat g - g\|^2$ (noise-corrected)", "log"),
    "snr": (
        r"$\|\mathbb{E}\hat g\| / \sqrt{\mathrm{tr}\,\mathrm{Cov}(\hat g)}$",
        "log",
    ),
    "cos_true": (r"$\cos(\hat g,\, g)$", "cosine"),
    "cos_pairwise": (r"$\cos(\hat g,\, \hat g')$", "cosine"),
    "cos_mean": (r"$\cos(\mathbb{E}\hat g,\, g)$", "cosine"),
}
# the study's standard figures: file stem -> metric
ONE_OVER_N = ("rel_variance", "variance", "mse")  # metrics that fall as 1/n
STUDY_FIGURES = {
    "rel_variance_vs_batch_size": "rel_variance",
    "variance_vs_batch_size": "variance",
    "cosine_vs_batch_size": "cos_true",
}
STYLE = {
    "font.family": "serif",
    "font.serif": ["STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "pdf.fonttype": 42,  # TrueType: editable text in the PDF
    "svg.fonttype": "none",  # text stays text in the SVG
    "svg.hashsalt": "rl_pg",  # the same figure gives the same SVG
}


def family_of(name: str) -> Family:
    """The family of an estimator name (:data:`OTHER` for unknown names)."""
    for family in FAMILIES:
        if name in family.members:
            return family
    for family in FAMILIES:
        if any(name.startswith(p) for p in family.prefixes):
            return family
    return OTHER


def display_name(name: str) -> str:
    """How an estimator is named in a legend."""
    return DISPLAY.get(name, name.replace("_", " "))


def series_styles(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Colour (the family's), line style and marker (by the name's place in its
    family: known members first, in :data:`FAMILIES` order) of every name."""
    names = list(dict.fromkeys(names))
    styles = {}
    for family in (*FAMILIES, OTHER):
        mine = [n for n in names if family_of(n) is family]
        mine.sort(
            key=lambda n: (
                n not in family.members,
                family.members.index(n) if n in family.members else names.index(n),
            )
        )
        for i, n in enumerate(mine):
            styles[n] = dict(
                color=family.color,
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                marker=MARKERS[i % len(MARKERS)],
                family=family.name,
            )
    return styles


_ENV_STEPS = re.compile(r"env_steps_(\d+)")  # a kept checkpoint's directory name


def steps_text(steps: float, digits: int = 3) -> str:
    """A step count as a reader says it: 512, 1.6k, 2.5M, 1.2B (``digits``
    significant digits)."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(steps) >= size:
            return f"{steps / size:.{digits}g}{suffix}"
    return f"{steps:.{digits}g}"


def stage_label(label: Any, width: int = 18, digits: int = 3) -> str:
    """How a stage (a panel row, a panel) is named in a figure: a kept
    checkpoint ``env_steps_000000001600`` as "1.6k steps", other long labels
    wrapped to lines of ``width`` characters."""
    label = str(label)
    match = _ENV_STEPS.fullmatch(label)
    if match:
        return f"{steps_text(int(match.group(1)), digits)} steps"
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label


def stage_titles(labels: Sequence[Any], width: int = 18) -> dict[Any, str]:
    """:func:`stage_label` of each of a figure's stages, with as many significant
    digits as keep kept checkpoints apart ("100.2M steps", "100.4M steps" where
    3 digits would name both "100M steps")."""
    for digits in range(3, 16):
        names = {label: stage_label(label, width, digits) for label in labels}
        if len(set(names.values())) == len(names):
            break
    return names


def steps_axis(ax) -> None:
    """Env-step x ticks as 500, 1.5k, 2M (the data stay raw steps)."""
    from matplotlib import ticker

    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: steps_text(x)))


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A CSV file as dicts; numbers parsed (empty cells -> nan), text kept."""

    def parse(value: str) -> Any:
        if value in ("", None):
            return math.nan
        try:
            return float(value)
        except ValueError:
            return value

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


_NO_RC_LAYOUT = {"figure.autolayout": False, "figure.constrained_layout.use": False}


def save(fig: Any, path: str | os.PathLike, formats: Sequence[str] = ()) -> list[Path]:
    """Save ``fig`` atomically to ``path`` (its suffix picks the format) and
    beside it in each of ``formats`` (same stem); returns the files written."""
    path = Path(path)
    suffixes = dict.fromkeys([path.suffix.lstrip(".").lower(), *formats])
    for fmt in suffixes:
        if fmt not in FORMATS:
            raise ValueError(f"figure format must be one of {FORMATS}, got {fmt!r}")
    written = []
    # the writers read the fonttype and font settings when saving, not when the
    # figure is built: without them the PDF gets Type 3 fonts, the SVG paths
    # (and no layout from the user's rc when the engine is removed below)
    with pyplot().rc_context(STYLE | _NO_RC_LAYOUT):
        for fmt in suffixes:
            target = path.with_suffix(f".{fmt}")
            io.save_figure(fig, target, dpi=150 if fmt == "png" else None)
            written.append(target)
            # the layout of the first save holds for the others (constrained
            # layout costs as much as drawing: keep its positions); None, not
            # "none": a placeholder engine still makes savefig draw twice
            fig.set_layout_engine(None)
    return written


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------- axis helpers


def _finite(*arrays: Any) -> np.ndarray:
    values = np.concatenate([np.ravel(np.asarray(a, float)) for a in arrays] or [[]])
    return values[np.isfinite(values)]


def axis_limits(scale: str, y: Any, lo: Any, hi: Any) -> tuple[str, tuple | None]:
    """The y scale and limits that show every point and every band.

    ``cosine``: linear, limits from the lowest band edge to the highest, padded
    by 5% and kept within [-1, 1]. ``log``: log when every finite point is
    positive, limits from the positive points and band edges (a band reaching 0
    or infinity is cut at the axis). Otherwise linear, matplotlib's limits.
    """
    points = _finite(y)
    if scale == "cosine":
        values = _finite(y, lo, hi)
        if not values.size:
            return "linear", (-1.0, 1.0)
        low, high = values.min(), values.max()
        pad = 0.05 * max(high - low, 0.02)
        return "linear", (max(-1.0, low - pad), min(1.0, high + pad))
    if scale == "log" and points.size and (points > 0).all():
        values = _finite(y, lo, hi)
        values = values[values > 0]
        return "log", (values.min() / 1.5, values.max() * 1.5)
    return "linear", None


def _band(lo: np.ndarray, hi: np.ndarray, yscale: str, limits) -> tuple:
    """Band edges drawable on the axis: nan/inf or non-positive (log) edges are
    cut at the axis limits."""
    if limits is None:
        return np.where(np.isfinite(lo), lo, np.nan), np.where(
            np.isfinite(hi), hi, np.nan
        )
    bottom, top = limits
    lo = np.where(np.isfinite(lo) & ((lo > 0) | (yscale != "log")), lo, bottom)
    hi = np.where(np.isfinite(hi), hi, top)
    return np.clip(lo, bottom, top), np.clip(hi, bottom, top)


# ------------------------------------------------------------ faceted figures


class Series(NamedTuple):
    """One line with its 95% band (arrays of equal length)."""

    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _all(table: dict[str, dict[str, Series]], field: str) -> list[np.ndarray]:
    return [getattr(s, field) for panel in table.values() for s in panel.values()]


def _families(names: Sequence[str], styles: dict) -> list[Family]:
    present = {styles[n]["family"] for n in names}
    return [f for f in (*FAMILIES, OTHER) if f.name in present]


def _draw_series(ax, name: str, series: Series, style: dict, label: str, row: str):
    (line,) = ax.plot(
        series.x,
        series.y,
        color=style["color"],
        linestyle=style["linestyle"],
        marker=style["marker"],
        label=label,
        markerfacecolor="white" if label.endswith("*") else style["color"],
    )
    line.set_gid(f"series:{row}:{name}")
    return line


def facet_figure(
    table: dict[str, dict[str, Series]],
    ylabel: str,
    scale: str,
    xlabel: str,
    *,
    xlog: bool = True,
    rescaled: frozenset = frozenset(),
    reference: "Callable[[Series], np.ndarray] | None" = None,
    xticks: Sequence[float] | None = None,
):
    """Small multiples: one row of panels per row label of ``table`` (e.g. a
    policy), one column per estimator family present, shared axes; each line
    with its 95% band (an interval unbounded above: a dotted arrow to the top).
    ``reference(series) -> y``: a grey dotted guide in each panel through its
    first series with a finite positive first point (e.g. 1/n).
    Lines carry the SVG id ``series:<row>:<estimator>``. Returns the figure."""
    plt = pyplot()
    names = list(dict.fromkeys(n for panel in table.values() for n in panel))
    styles = series_styles(names)
    families = _families(names, styles)
    rows = list(table)
    row_names = stage_titles(rows)
    yscale, limits = axis_limits(
        scale, _all(table, "y"), _all(table, "lo"), _all(table, "hi")
    )
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            len(rows),
            len(families),
            sharex=True,
            sharey=True,
            squeeze=False,
            figsize=(0.4 + 1.9 * len(families), 0.9 + 1.55 * len(rows)),
            layout="constrained",
        )
        unbounded = False
        for i, row in enumerate(rows):
            for j, family in enumerate(families):
                ax = axes[i, j]
                mine = {
                    n: v
                    for n, v in table[row].items()
                    if styles[n]["family"] == family.name
                }
                unbounded |= _panel(
                    ax,
                    mine,
                    styles,
                    reference,
                    row=row,
                    yscale=yscale,
                    limits=limits,
                    rescaled=rescaled,
                )
                _decorate(ax, yscale, limits, scale, xlog, xticks)
                _label_panel(
                    ax, mine, family, row_names[row], xlabel,
                    i == len(rows) - 1, j, i,
                )  # fmt: skip
        fig.supylabel(ylabel, fontsize=STYLE["axes.labelsize"])
        _footnote(
            fig, unbounded, bool(rescaled & set(names)), guide=reference is not None
        )
    return fig


class GridRow(NamedTuple):
    """One row of panels of :func:`grid_figure`: its id (SVG ids
    ``series:<key>:<estimator>``), y label, scale (as in :data:`METRICS`) and
    series (estimator -> Series)."""

    key: str
    label: str
    scale: str
    table: dict[str, Series]


def grid_figure(
    rows: Sequence[GridRow],
    xlabel: str,
    *,
    xticks: Sequence[float],
    xticklabels: Sequence[str],
    rescaled: frozenset = frozenset(),
    empty: str = "",
    title: str = "",
    notes: Sequence[str] = (),
):
    """Small multiples of rows that each have their own metric (e.g. stage x
    metric): one column per estimator family present, x shared (log, the
    given ticks), y shared within a row and fit to its points and bands.
    Each family's legend above its column names every estimator of the
    column (``rescaled`` ones starred); ``empty``: the note in a panel with
    no estimator of its family (e.g. a metric the family cannot have)."""
    plt = pyplot()
    names = list(dict.fromkeys(n for row in rows for n in row.table))
    with plt.rc_context(STYLE):
        fig, axes, styles, families = _family_grid(names, len(rows), 0.9, 1.45)
        unbounded = False
        for i, row in enumerate(rows):
            drawn, mines = _row_of_panels(
                axes[i], row.table, families, styles, row.key, row.scale, rescaled
            )
            unbounded |= drawn
            for ax, mine in zip(axes[i], mines, strict=True):
                _grid_axes(ax, row, xlabel, xticks, xticklabels, i == len(rows) - 1)
                if not mine and empty:
                    _note(ax, empty)
        for j, family in enumerate(families):
            _column_legend(axes[:, j], family)
        if title:
            fig.suptitle(title, fontsize=STYLE["axes.titlesize"])
        _footnote(fig, unbounded, False, notes=notes)
    return fig


def _family_grid(names, num_rows: int, margin: float, row_height: float):
    """(fig, axes [num_rows, families], styles, families): one column per
    estimator family of ``names``, x shared, y shared within a row (call it
    inside ``STYLE``)."""
    styles = series_styles(names)
    families = _families(names, styles)
    fig, axes = pyplot().subplots(
        num_rows,
        len(families),
        sharex=True,
        sharey="row",
        squeeze=False,
        figsize=(margin + 1.9 * len(families), 0.9 + row_height * num_rows),
        layout="constrained",
    )
    return fig, axes, styles, families


def _row_of_panels(
    axes, table, families, styles, key: str, scale: str, rescaled=frozenset()
) -> tuple[bool, list[dict]]:
    """One row of small multiples: each family's series of ``table`` in its
    column, y fit to the row's points and bands. Returns whether a band is
    unbounded above, and each column's series."""
    yscale, limits = axis_limits(
        scale, *(_all({key: table}, f) for f in ("y", "lo", "hi"))
    )
    unbounded, mines = False, []
    for ax, family in zip(axes, families, strict=True):
        mine = {n: v for n, v in table.items() if styles[n]["family"] == family.name}
        unbounded |= _panel(
            ax, mine, styles, None, row=key, yscale=yscale, limits=limits,
            rescaled=rescaled,
        )  # fmt: skip
        _decorate(ax, yscale, limits, scale, False, None)
        mines.append(mine)
    return unbounded, mines


def _grid_axes(ax, row: GridRow, xlabel, xticks, xticklabels, bottom: bool) -> None:
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.set_xticks(list(xticks), list(xticklabels))
    ax.xaxis.set_minor_locator(ticker.NullLocator())  # only the given ticks
    if bottom:
        ax.set_xlabel(xlabel)
    if ax.get_subplotspec().is_first_col():
        ax.set_ylabel(row.label)


def _note(ax, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=6,
        color=REFERENCE_COLOR,
    )


def _column_legend(axes, family: Family) -> None:
    """The family's legend above a column: every estimator drawn in it."""
    handles = {}
    for ax in axes:
        for line in ax.get_lines():
            label = line.get_label()
            if not label.startswith("_"):
                handles.setdefault(label, line)
    axes[0].legend(
        list(handles.values()),
        list(handles),
        loc="lower left",
        bbox_to_anchor=(0.0, 1.02),
        frameon=False,
        title=family.name,
        borderaxespad=0,
        alignment="left",
        handlelength=2.6,
    )


def _footnote(
    fig, unbounded: bool, rescaled: bool, guide: bool = False, notes=()
) -> None:
    """What the bands, arrows, guides and stars of a faceted figure mean
    (``notes``: more, last)."""
    extra, notes = list(notes), ["bands: 95% intervals"]
    if guide:
        notes.append(r"grey dotted: $\propto 1/n$ (an i.i.d. mean's rate)")
    if unbounded:
        notes.append("dotted arrows: unbounded above")
    if rescaled:
        notes.append(r"* on another scale than $\nabla J$ (compare scale-free metrics)")
    notes += extra
    fig.supxlabel("; ".join(notes), fontsize=6, x=0.99, ha="right")


def _panel(
    ax,
    mine: dict[str, Series],
    styles: dict,
    reference,
    *,
    row: str,
    yscale: str,
    limits,
    rescaled: frozenset,
) -> bool:
    """One panel's guide, lines and bands; whether a band is unbounded above."""
    if reference is not None:
        _reference(ax, reference, mine)
    unbounded = False
    for name, series in mine.items():
        label = display_name(name) + ("*" if name in rescaled else "")
        _draw_series(ax, name, series, styles[name], label, row)
        unbounded |= _draw_band(ax, series, styles[name]["color"], yscale, limits)
    return unbounded


def _label_panel(
    ax,
    mine,
    family: Family,
    row: str,
    xlabel: str,
    bottom: bool,
    column: int,
    line: int,
) -> None:
    """Axis labels on the edges, the family's legend above the top row, and a
    note in a panel with nothing finite to draw."""
    if mine and not _finite(*(v.y for v in mine.values())).size:
        ax.text(
            0.5,
            0.5,
            "no finite value\n(mean indistinguishable from 0)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=6,
            color=REFERENCE_COLOR,
        )
    if bottom:
        ax.set_xlabel(xlabel)
    if column == 0 and row:
        ax.set_ylabel(row, fontweight="bold")
    if line == 0:
        ax.legend(
            loc="lower left",
            bbox_to_anchor=(0.0, 1.02),
            frameon=False,
            title=family.name,
            borderaxespad=0,
            alignment="left",
            handlelength=2.6,
        )


def _reference(ax, reference, panel: dict[str, Series]) -> None:
    for series in panel.values():
        if series.y.size and np.isfinite(series.y[0]) and series.y[0] > 0:
            ax.plot(
                series.x,
                reference(series),
                ":",
                color=REFERENCE_COLOR,
                lw=1,
                zorder=1,
            )
            return


def _draw_band(ax, series: Series, color: str, yscale: str, limits) -> bool:
    """The 95% band; where it is unbounded above, a dotted arrow from the point
    to the top of the axis instead (returns whether it drew one)."""
    lo, hi = _band(series.lo, series.hi, yscale, limits)
    bounded = np.isfinite(series.hi)
    ax.fill_between(
        series.x,
        lo,
        hi,
        where=bounded,
        color=color,
        alpha=0.15,
        lw=0,
        interpolate=False,
    )
    if limits is None:
        return False
    arrows = False
    for x, y, top in zip(series.x, series.y, bounded, strict=True):
        if not top and np.isfinite(y):
            arrows = True
            ax.annotate(
                "",
                xy=(x, limits[1]),
                xytext=(x, y),
                arrowprops=dict(
                    arrowstyle="->", color=color, lw=0.6, linestyle=":", alpha=0.7
                ),
            )
    return arrows


def _decorate(ax, yscale: str, limits, scale: str, xlog: bool, xticks) -> None:
    ax.set_yscale(yscale)
    if limits is not None:
        ax.set_ylim(*limits)
    if xlog:
        ax.set_xscale("log", base=2)
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
        from matplotlib import ticker

        ax.xaxis.set_minor_locator(ticker.NullLocator())  # only the given ticks
    if scale == "cosine" and limits and limits[0] < 0 < limits[1]:
        ax.axhline(0, color=REFERENCE_COLOR, lw=0.5, zorder=0)
    ax.grid(alpha=0.25, lw=0.5)


# ------------------------------------------------------------------ the study


def _pick(rows: list[dict], estimators: Sequence[str] | None) -> list[dict]:
    """Rows of the chosen estimators (ValueError naming unknown ones)."""
    if not rows:
        raise ValueError("no result rows to plot")
    known = list(dict.fromkeys(r["estimator"] for r in rows))
    if estimators is None:
        return rows
    unknown = [e for e in estimators if e not in known]
    if unknown:
        raise ValueError(f"estimator(s) {unknown} not in the results; known: {known}")
    order = {e: i for i, e in enumerate(estimators)}
    return sorted(
        (r for r in rows if r["estimator"] in order),
        key=lambda r: order[r["estimator"]],
    )


def _check_metric(rows: list[dict], metric: str) -> None:
    if metric not in rows[0] or f"{metric}_lo" not in rows[0]:
        have = [m for m in METRICS if m in rows[0]]
        raise ValueError(f"unknown metric {metric!r}; the results have {have}")


def _series(rows: list[dict], x: str, metric: str) -> Series:
    rows = sorted(rows, key=lambda r: r[x])
    col = lambda k: np.array([float(r[k]) for r in rows])
    return Series(col(x), col(metric), col(f"{metric}_lo"), col(f"{metric}_hi"))


def study_table(rows: list[dict], metric: str) -> dict[str, dict[str, Series]]:
    """checkpoint -> estimator -> the metric against batch size."""
    table: dict[str, dict[str, Series]] = {}
    for stage in dict.fromkeys(r["checkpoint"] for r in rows):
        mine = [r for r in rows if r["checkpoint"] == stage]
        table[str(stage)] = {
            e: _series([r for r in mine if r["estimator"] == e], "batch_size", metric)
            for e in dict.fromkeys(r["estimator"] for r in mine)
        }
    return table


def _one_over_n(series: Series) -> np.ndarray:
    """y0 n0 / n through the first point: the rate of an i.i.d. batch mean."""
    return series.y[0] * series.x[0] / series.x


def study_figure(
    rows: list[dict],
    metric: str,
    estimators: Sequence[str] | None = None,
    rescaled: frozenset = KNOWN_RESCALED,
):
    """The faceted figure of ``metric`` against batch size (rows of
    ``results.csv`` as dicts: one panel row per checkpoint)."""
    rows = _pick(rows, estimators)
    _check_metric(rows, metric)
    label, scale = METRICS.get(metric, (metric.replace("_", " "), "log"))
    table = study_table(rows, metric)
    sizes = sorted({float(r["batch_size"]) for r in rows})
    return facet_figure(
        table,
        label,
        scale,
        r"batch size $n$ (trajectories)",
        rescaled=frozenset(rescaled) if metric == "variance" else frozenset(),
        reference=_one_over_n if metric in ONE_OVER_N else None,
        xticks=sizes,
    )


def study_figures(
    rows: list[dict],
    out_dir: str | os.PathLike,
    rescaled: frozenset = KNOWN_RESCALED,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """The study's standard figures (:data:`STUDY_FIGURES`: relative variance,
    variance and cosine against batch size) in ``out_dir``, each as PNG, PDF and
    SVG. ``rows``: ``results.csv``'s rows as dicts (e.g. ``result_rows``).
    Returns the files written."""
    plt = pyplot()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for stem, metric in STUDY_FIGURES.items():
        fig = study_figure(rows, metric, rescaled=rescaled)
        written += save(fig, Path(out_dir) / f"{stem}.{formats[0]}", formats)
        plt.close(fig)
    return written


def plot_study(
    results_dir: str | os.PathLike,
    metric: str = "rel_variance",
    estimators: Sequence[str] | None = None,
    fmt: str | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Redraw ``metric`` against batch size from a finished study's
    ``results.csv`` into ``out`` (default ``RESULTS_DIR/<metric>_vs_batch_size.
    <fmt>``; its suffix, if any, picks the format). Never overwrites a file."""
    path = Path(results_dir) / "results.csv"
    if not path.is_file():
        raise ValueError(f"{results_dir} has no results.csv (not a variance study)")
    out = _out_path(out, Path(results_dir) / f"{metric}_vs_batch_size", fmt)
    fig = study_figure(read_csv(path), metric, estimators)
    save(fig, out)
    pyplot().close(fig)
    return out


def _out_path(out, default: Path, fmt: str | None) -> Path:
    """The figure file to create: ``out`` (FileExistsError if it exists), or by
    default ``default`` with the format's suffix, or if the run already holds
    that file ``<stem>_redrawn``, ``<stem>_redrawn_2``, ... (never overwritten).
    ``fmt`` None: ``out``'s suffix, else pdf; given, it must agree with that suffix."""
    suffix = Path(out).suffix.lstrip(".").lower() if out is not None else ""
    if suffix and suffix not in FORMATS:
        raise ValueError(f"--out must end in one of {FORMATS}, got {out}")
    if fmt is not None and suffix and suffix != fmt:
        raise ValueError(f"--out {out} and --format {fmt} disagree: give one of them")
    fmt = fmt or suffix or "pdf"
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if out is None:
        path, k = default.with_suffix(f".{fmt}"), 1
        while path.exists():
            path = default.with_name(
                f"{default.name}_redrawn{'' if k == 1 else f'_{k}'}.{fmt}"
            )
            k += 1
        return path
    path = Path(out) if suffix else Path(out).with_suffix(f".{fmt}")
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    io.check_can_create(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as rl-pg render does
    return path


ALONG_TRAINING = ("cos_true", "snr", "rel_variance")  # the along-training rows


def along_training_table(
    rows: list[dict], steps: dict[str, float], metric: str, batch_size: float
) -> dict[str, Series]:
    """estimator -> ``metric`` at ``batch_size`` against the env steps of each
    checkpoint (``steps``: checkpoint -> env steps; nan where a checkpoint lacks
    the estimator, e.g. critic estimators of a policy without a critic)."""
    labels = sorted(steps, key=lambda k: steps[k])
    x = np.array([steps[k] for k in labels], float)
    at = {
        (r["checkpoint"], r["estimator"]): r
        for r in rows
        if float(r["batch_size"]) == float(batch_size)
    }
    table = {}
    for e in dict.fromkeys(r["estimator"] for r in rows):
        found = [at.get((k, e)) for k in labels]
        col = lambda c: np.array([r[c] if r else np.nan for r in found], float)  # noqa: B023
        table[e] = Series(x, col(metric), col(f"{metric}_lo"), col(f"{metric}_hi"))
    return table


def along_training_figure(
    rows: list[dict],
    steps: dict[str, float],
    metrics: Sequence[str] = ALONG_TRAINING,
    batch_size: float | None = None,
):
    """Each estimator's ``metrics`` at the largest batch size (or
    ``batch_size``) against the env steps of its checkpoints (Ilyas et al. 2020,
    figure 2): one row of panels per metric, one column per estimator family,
    95% bands. ``rows``: ``results.csv``'s rows as dicts."""
    plt = pyplot()
    n = batch_size or max(float(r["batch_size"]) for r in rows)
    steps = {k: float(v) for k, v in steps.items()}
    tables = {m: along_training_table(rows, steps, m, n) for m in metrics}
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    with plt.rc_context(STYLE):
        fig, axes, styles, families = _family_grid(names, len(metrics), 0.4, 1.55)
        unbounded = False
        for i, metric in enumerate(metrics):
            label, scale = METRICS.get(metric, (metric.replace("_", " "), "log"))
            drawn, mines = _row_of_panels(
                axes[i], tables[metric], families, styles, metric, scale
            )
            unbounded |= drawn
            for j, (ax, family, mine) in enumerate(
                zip(axes[i], families, mines, strict=True)
            ):
                _label_panel(
                    ax,
                    mine,
                    family,
                    label,
                    "env steps",
                    i == len(metrics) - 1,
                    j,
                    i,
                )
                steps_axis(ax)
        fig.suptitle(f"along training, batch size $n = {n:g}$", fontsize=8)
        _footnote(fig, unbounded, False)
    return fig


def score_axis(ax, which: str = "y") -> None:
    """A score axis (pipes, >= 0): symlog (linear below 10 pipes) where the
    data reach past 10, else linear; from just below 0 (so zero scores stay off
    the spine) to at least 1; ticks as plain numbers. Data below 0 (another
    env's returns) keep matplotlib's own limits and scale."""
    from matplotlib import ticker

    axis = ax.yaxis if which == "y" else ax.xaxis
    set_limits = ax.set_ylim if which == "y" else ax.set_xlim
    low, high = ax.dataLim.intervaly if which == "y" else ax.dataLim.intervalx
    if np.isfinite(low) and low < 0:
        return
    top = max((ax.get_ylim() if which == "y" else ax.get_xlim())[1], 1.0)
    if top > 10:  # the linear limits' margin is thin on a log scale: widen it
        (ax.set_yscale if which == "y" else ax.set_xscale)("symlog", linthresh=10)
        top *= 1.3
    set_limits(-0.03 * min(top, 10.0), top)
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def _score_axes(ax) -> None:
    """Env steps against score in pipes (:func:`score_axis`)."""
    steps_axis(ax)
    ax.set_xlabel("env steps")
    ax.set_ylabel("score (pipes)")
    score_axis(ax)


def learning_curve_figure(rows: list[dict[str, Any]], title: str = ""):
    """A training run's validation median, best so far and training mean
    (exploring) against env steps (``metrics.csv`` rows as dicts), symlog
    score axis (linear below 10 pipes)."""
    plt = pyplot()
    x = np.array([float(r["env_steps"]) for r in rows], float)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.5, 2.8), layout="constrained")
        for i, (column, name, style) in enumerate(SCORE_LINES):
            if rows and column in rows[0]:
                ax.plot(
                    x,
                    [float(r[column]) for r in rows],
                    linestyle=style,
                    # one evaluation is a point: a line alone would not show it
                    marker=MARKERS[i] if i == 0 or len(x) == 1 else None,
                    color=OKABE_ITO[i],
                    label=name,
                    gid=f"series:score:{column}",
                )
        _score_axes(ax)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.25, lw=0.5)
        ax.legend(frameon=False)
    return fig


DECOMPOSITION_PARTS = {  # component -> (label, colour)
    "state": ("state", OKABE_ITO[0]),
    "action": ("action", OKABE_ITO[2]),
    "trajectory": ("trajectory (rest)", OKABE_ITO[1]),
}


def decomposition_figure(rows: Sequence[dict]):
    """The variance decomposition (Tucker et al. 2018): per checkpoint, one
    stacked bar per estimator (state, action and trajectory parts of tr Var(y);
    negative method-of-moments estimates drawn as 0, the table keeps them) and
    the separately measured total with its 95% interval (black diamond)."""
    plt = pyplot()
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    titles = stage_titles(checkpoints)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1,
            len(checkpoints),
            squeeze=False,
            figsize=(0.6 + 2.6 * len(checkpoints), 2.9),
            layout="constrained",
        )
        for ax, ckpt in zip(axes[0], checkpoints, strict=True):
            value = {
                (r["estimator"], r["component"]): r
                for r in rows
                if r["checkpoint"] == ckpt
            }
            names = list(dict.fromkeys(e for e, _ in value))
            x = np.arange(len(names))
            bottom = np.zeros(len(names))
            for comp, (label, color) in DECOMPOSITION_PARTS.items():
                h = np.array([max(value[(n, comp)]["variance"], 0.0) for n in names])
                ax.bar(x, h, 0.65, bottom=bottom, color=color, label=label, lw=0)
                bottom += h
            tot = [value[(n, "total")] for n in names]
            mid = np.array([t["variance"] for t in tot])
            lo = np.array([t["variance_lo"] for t in tot])
            hi = np.array([t["variance_hi"] for t in tot])
            ax.errorbar(
                x, mid, yerr=np.maximum([mid - lo, hi - mid], 0.0), fmt="D",
                color="black", ms=3, capsize=2, lw=0.8, label="total (measured apart)",
            )  # fmt: skip
            ax.set_xticks(x, [display_name(n) for n in names], rotation=35, ha="right")
            ax.set_title(titles[ckpt] or "policy")
            ax.grid(axis="y", alpha=0.25, lw=0.5)
        axes[0, 0].set_ylabel(
            r"$\mathrm{tr}\,\mathrm{Var}(y)$, $y = \hat A\,\nabla\log\pi(a|s)$"
        )
        axes[0, -1].legend(frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    return fig


# ------------------------------------------------------------- training runs

SCORE_LINES = (  # metric "score": column, label, line style
    ("val_median", "validation median", "-"),
    ("best_median", "best so far", "--"),
    ("train_score_mean", "training mean (exploring)", ":"),
)


def _cell_label(row: dict) -> str:
    """A sweep cell's name from its ``summary.csv`` row: its swept fields, as
    :mod:`rl_pg.runs.sweep` names it ("lr=0.001, ent_coef=0.01", or "defaults")."""
    fields = [k for k in row if k not in ("cell", "seed", "run_dir")]
    fields = fields[: fields.index("median_score")] if "median_score" in fields else []
    return (
        ", ".join(
            f"{k}={row[k]:g}" if isinstance(row[k], float) else f"{k}={row[k]}"
            for k in fields
        )
        or "defaults"
    )


def _runs(run_dir: Path) -> dict[str, list[Path]]:
    """Label -> run directories: the run itself, or a sweep's runs by cell."""
    if (run_dir / "metrics.csv").is_file():
        return {"": [run_dir]}
    summary = run_dir / "summary.csv"
    if (run_dir / "results.csv").is_file():
        raise ValueError(
            f"{run_dir} is a variance study (results.csv): its figures are "
            "--figure batch_size, along_training, decomposition (a lag study's: "
            "vs_staleness); learning curves are a training run's or sweep's"
        )
    if not summary.is_file():
        raise ValueError(
            f"{run_dir} has neither metrics.csv (a training run) nor summary.csv "
            "(a sweep) nor results.csv (a variance study)"
        )
    runs: dict[str, list[Path]] = {}
    for row in read_csv(summary):
        runs.setdefault(_cell_label(row), []).append(run_dir / str(row["run_dir"]))
    return runs


def _run_lines(ax, rows: list[dict], metric: str, label: str, run: Path, **style):
    """One run's lines of ``metric`` (``score``: :data:`SCORE_LINES`; a sweep's
    run, ``label`` its cell: the first only, in the legend if ``first``); a
    marker where one point is all."""
    first = style.pop("first")
    lines = SCORE_LINES if metric == "score" else ((metric, metric, "-"),)
    if not rows:
        return
    if metric != "score" and metric not in rows[0]:
        raise ValueError(f"unknown metric {metric!r}; metrics.csv has {list(rows[0])}")
    x = np.array([r["env_steps"] for r in rows], float)
    for column, name, linestyle in lines:
        if column not in rows[0] or (label and column != lines[0][0]):
            continue
        ax.plot(
            x,
            [r[column] for r in rows],
            linestyle,
            marker="o" if x.size == 1 else None,
            label=(label or name) if first else None,
            gid=f"series:{label or column}:{run.name}",
            **style,
        )


def run_figure(run_dir: str | os.PathLike, metric: str = "score"):
    """``metric`` (a ``metrics.csv`` column, or ``score``: validation median,
    best so far and training mean) against env steps; a sweep's runs drawn one
    colour per cell, one thin line per seed."""
    plt = pyplot()
    runs = _runs(Path(run_dir))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.5, 2.8), layout="constrained")
        for c, (label, dirs) in enumerate(runs.items()):
            for k, d in enumerate(dirs):
                _run_lines(
                    ax, read_csv(d / "metrics.csv"), metric, label, d, first=k == 0,
                    color=OKABE_ITO[c % len(OKABE_ITO)],
                    lw=1.0 if len(dirs) > 1 else 1.3,
                )  # fmt: skip
        if metric == "score":
            _score_axes(ax)
        else:
            steps_axis(ax)
            ax.set_xlabel("env steps")
            ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.25, lw=0.5)
        ax.legend(frameon=False)
    return fig


def plot_run(
    run_dir: str | os.PathLike,
    metric: str = "score",
    fmt: str | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Redraw a training run's (or a sweep's) ``metric`` from its metrics.csv
    files into ``out`` (default ``RUN_DIR/<metric>.<fmt>``). Never overwrites."""
    out = _out_path(out, Path(run_dir) / metric, fmt)
    fig = run_figure(run_dir, metric)
    save(fig, out)
    pyplot().close(fig)
    return out


# ---------------------------------------------------------------- sweeps


def sweep_figure(
    scores: dict[str, Sequence[float]],
    stats: dict[str, dict] | None = None,
    title: str = "",
):
    """Held-out score per sweep cell, one row per cell (the first on top): each
    seed's score as a hollow point and, given ``stats`` (label -> ``iqm``,
    ``iqm_lo``, ``iqm_hi``: :func:`rl_pg.runs.aggregate.interval_estimates`, or
    ``aggregate.csv``'s rows), the interquartile mean over seeds with its 95%
    stratified-bootstrap interval (Agarwal et al. 2021), also written out."""
    plt = pyplot()
    labels = list(scores)
    rows = np.arange(len(labels))[::-1]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(
            figsize=(5.0, 1.2 + 0.32 * len(labels)), layout="constrained"
        )
        for k, (label, y) in enumerate(zip(labels, rows, strict=True)):
            values = np.asarray(scores[label], float)
            spread = np.linspace(-0.15, 0.15, values.size) if values.size > 1 else 0
            ax.plot(
                values, y + spread, "o", mfc="none", mew=0.8, ms=3.5,
                color=REFERENCE_COLOR, label="seeds" if k == 0 else None,
                gid=f"series:seeds:{label}",
            )  # fmt: skip
            if stats is not None:
                _iqm_interval(ax, y, stats[label], label, first=k == 0)
        ax.set_yticks(rows, labels)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        score_axis(ax, "x")
        ax.set_xlabel("held-out median score (pipes)")
        ax.grid(axis="x", alpha=0.25, lw=0.5)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, frameon=False)
        if title:
            fig.suptitle(title, fontsize=8)
        fig.supxlabel(
            "IQM: interquartile mean over seeds, 95% stratified-bootstrap "
            "interval (rliable)"
            if stats is not None
            else "IQM over seeds and its interval: pip install 'rl_pg[viz]'",
            fontsize=6,
            x=0.99,
            ha="right",
        )
    return fig


def _iqm_interval(ax, y: float, stat: dict, label: str, first: bool) -> None:
    """The IQM with its interval at row ``y``, and its value right of the axes."""
    iqm, lo, hi = (float(stat[k]) for k in ("iqm", "iqm_lo", "iqm_hi"))
    bars = ax.errorbar(
        iqm, y, xerr=[[max(iqm - lo, 0.0)], [max(hi - iqm, 0.0)]], fmt="D",
        color=OKABE_ITO[0], ms=4, capsize=2.5, lw=1.2,
        label="IQM, 95% interval" if first else None,
    )  # fmt: skip
    bars.lines[0].set_gid(f"series:iqm:{label}")
    ax.annotate(
        f"{iqm:.3g} [{lo:.3g}, {hi:.3g}]",
        xy=(1, y),
        xycoords=("axes fraction", "data"),
        xytext=(6, 0),
        textcoords="offset points",
        va="center",
        fontsize=6,
        color=OKABE_ITO[0],
    )


def sweep_scores(
    sweep_dir: str | os.PathLike,
) -> tuple[dict[str, list[float]], dict[str, dict] | None]:
    """A sweep's held-out scores by cell label (``summary.csv``) and, where the
    sweep wrote them, its seed statistics by cell label (``aggregate.csv``)."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "summary.csv").is_file():
        raise ValueError(f"{sweep_dir} has no summary.csv (not a sweep)")
    path = sweep_dir / "aggregate.csv"
    table = read_csv(path) if path.is_file() else []
    names = {int(r["cell"]): str(r["label"]) for r in table}
    scores: dict[str, list[float]] = {}
    for row in read_csv(sweep_dir / "summary.csv"):
        label = names.get(int(row["cell"])) or _cell_label(row)
        scores.setdefault(label, []).append(float(row["median_score"]))
    return scores, ({str(r["label"]): r for r in table} or None)


# ------------------------------------------------------------- vs_staleness


def _staleness_x(rows: list[dict], with_k: bool) -> tuple[np.ndarray, float]:
    """x positions on a log axis (KL 0 at a visible left edge) and that edge."""
    kl = np.array([r["lag_kl"] if with_k else r["lag_level"] for r in rows], float)
    positive = kl[kl > 0]
    edge = (positive.min() / 3.0) if positive.size else 1e-3
    return np.where(kl > 0, kl, edge), edge


# the figure's metrics: (column, y label, scale as in METRICS)
RELATIVE_MSE = r"$\mathbb{E}\|\hat g - g\|^2 / \|g\|^2$"
KL_LABEL = r"$\mathrm{KL}(\mu\,\|\,\pi)$ per step"
STALENESS_METRICS = (
    ("mse", RELATIVE_MSE, "log"),
    ("cos_true", METRICS["cos_true"][0], "cosine"),
)


def _staleness_xticks(x: np.ndarray, edge: float) -> tuple[list[float], list[str]]:
    """Every x when few (KL levels), else the edge and the decades between."""
    ticks = sorted(set(x.tolist()))
    if len(ticks) > 7:
        inner = [t for t in ticks if t > edge]
        low, high = (
            math.ceil(math.log10(min(inner))),
            math.floor(math.log10(max(inner))),
        )
        ticks = [edge] + [10.0**k for k in range(low, high + 1)]
    return ticks, ["0" if t == edge else f"{t:g}" for t in ticks]


def _lag_series(rows: list[dict], x: np.ndarray, metric: str) -> Series:
    """One estimator's ``metric`` against KL (mse relative to |g|^2)."""
    order = np.argsort(x, kind="stable")
    rows = [rows[i] for i in order]
    scale = np.array([r["reference_norm2"] if metric == "mse" else 1.0 for r in rows])
    scale = np.where(scale > 0, scale, np.nan)  # a zero truth: no relative MSE
    col = lambda k: np.array([r[k] for r in rows], float) / scale  # noqa: E731
    return Series(x[order], col(metric), col(f"{metric}_lo"), col(f"{metric}_hi"))


def staleness_rows(rows: list[dict], with_k: bool, rescaled: frozenset):
    """The figure's rows of panels (stage x metric, at the largest batch size),
    the x ticks and their labels, and the batch size."""
    largest = max(r["batch_size"] for r in rows)
    rows = [r for r in rows if r["batch_size"] == largest]
    x_all, edge = _staleness_x(rows, with_k)
    stages = (
        ["training lag"]
        if with_k
        else list(dict.fromkeys(r["checkpoint"] for r in rows))
    )
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    grid = []
    titles = stage_titles(stages)
    for stage in stages:
        mine = [i for i, r in enumerate(rows) if with_k or r["checkpoint"] == stage]
        for metric, label, scale in STALENESS_METRICS:
            table = {}
            for name in names:
                if metric == "mse" and name in rescaled:
                    continue  # not on grad J's scale: cosine only
                sel = [i for i in mine if rows[i]["estimator"] == name]
                table[name] = _lag_series([rows[i] for i in sel], x_all[sel], metric)
            text = titles[stage]
            grid.append(GridRow(f"{stage}:{metric}", f"{text}\n{label}", scale, table))
    return grid, _staleness_xticks(x_all, edge), largest


def staleness_figure(
    rows: list[dict], with_k: bool, rescaled: frozenset = KNOWN_RESCALED
):
    """The vs_staleness figure: relative MSE (non-rescaled estimators) and
    cosine to the true gradient against KL, a row of panels per stage and
    metric (one stage "training lag" with --lag-checkpoints), a column per
    estimator family, at the largest batch size, with 95% bands; ``rescaled``:
    the estimators not on grad J's scale (cosine only). Rows of a lag study's
    ``results.csv`` (:mod:`rl_pg.variance.lag_report` draws it)."""
    grid, (ticks, labels), largest = staleness_rows(rows, with_k, rescaled)
    return grid_figure(
        grid,
        KL_LABEL,
        xticks=ticks,
        xticklabels=labels,
        rescaled=rescaled,
        empty="rescaled: cosine only",
        title=f"batch size $n = {largest:g}$",
        notes=[r"* not on $\nabla J$'s scale: no relative MSE"],
    )


# -------------------------------------------------------------- rl-pg plot

REDRAWN = {  # rl-pg plot --figure: what it draws, from which files
    "batch_size": "a study's --metric against batch size (results.csv)",
    "along_training": "a study's cos_true, SNR and relative variance (or --metric) "
    "against env steps (results.csv, config.json: stages with env steps)",
    "decomposition": "a study's variance decomposition (decomposition.csv)",
    "learning_curve": "a run's or sweep's score (or --metric) against env steps "
    "(metrics.csv)",
    "sweep": "a sweep's IQM and seeds per cell (summary.csv, aggregate.csv)",
    "performance_profile": "a sweep's performance profiles (summary.csv; rliable)",
    "vs_staleness": "a lag study's relative MSE and cosine against KL (results.csv "
    "with lag_kl)",
}
STUDY_REDRAWN = ("batch_size", "along_training", "decomposition", "vs_staleness")


def plot(
    directory: str | os.PathLike,
    metric: str | None = None,
    estimators: Sequence[str] | None = None,
    fmt: str | None = None,
    out: str | os.PathLike | None = None,
    figure: str | None = None,
) -> Path:
    """``rl-pg plot``: redraw ``figure`` (:data:`REDRAWN`) from a finished
    directory's files into ``out`` (default: named after the figure in
    ``directory``, ``_redrawn`` added if taken: never overwritten);
    by default a study's (results.csv) ``metric`` against batch size (default
    rel_variance), a lag study's vs_staleness, a training run's or sweep's
    learning curves (default score)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such directory")
    study = (directory / "results.csv").is_file()
    lag = study and "lag_kl" in _header(directory / "results.csv")
    default = "vs_staleness" if lag else "batch_size" if study else "learning_curve"
    figure = figure or default
    if figure not in REDRAWN:
        raise ValueError(f"--figure must be one of {list(REDRAWN)}, got {figure!r}")
    if lag != (figure == "vs_staleness") and figure in STUDY_REDRAWN:
        raise ValueError(
            f"{directory} is a lag study: its figure is --figure vs_staleness"
            if lag
            else f"--figure vs_staleness draws a lag study (rl-pg variance --lag-kl "
            f"or --lag-checkpoints); {directory} is not one"
        )
    if estimators and figure not in STUDY_REDRAWN:
        raise ValueError("--estimators applies to a variance study's figures only")
    if metric and figure in (
        "decomposition", "sweep", "performance_profile", "vs_staleness"
    ):  # fmt: skip
        raise ValueError(f"--metric does not apply to --figure {figure}")
    if figure == "batch_size":
        return plot_study(directory, metric or "rel_variance", estimators, fmt, out)
    if figure == "learning_curve":
        return plot_run(directory, metric or "score", fmt, out)
    path = _out_path(out, directory / figure, fmt)
    fig = _REDRAW[figure](directory, metric, estimators)
    save(fig, path)
    pyplot().close(fig)
    return path


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _study_rows(directory: Path, name: str = "results.csv") -> list[dict]:
    if not (directory / name).is_file():
        raise ValueError(f"{directory} has no {name} (not a variance study)")
    return read_csv(directory / name)


def _redraw_along_training(directory: Path, metric, estimators):
    rows = _pick(_study_rows(directory), estimators)
    metrics = (metric,) if metric else ALONG_TRAINING
    for m in metrics:
        _check_metric(rows, m)
    config = json.loads((directory / "config.json").read_text())
    steps = {k: v.get("env_steps") for k, v in config.get("stages", {}).items()}
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    if len(labels) < 2 or any(steps.get(k) is None for k in labels):
        raise ValueError(
            f"{directory}: along_training needs two or more stages with env steps "
            "in config.json (rl-pg variance --run RUN_DIR)"
        )
    return along_training_figure(rows, {k: steps[k] for k in labels}, metrics)


def _redraw_decomposition(directory: Path, metric, estimators):
    name = "decomposition.csv"
    if not (directory / name).is_file():
        raise ValueError(f"{directory} has no {name} (run the study with --decompose)")
    return decomposition_figure(_pick(_study_rows(directory, name), estimators))


def _redraw_sweep(directory: Path, metric, estimators):
    scores, stats = sweep_scores(directory)
    config = directory / "config.json"
    algo = json.loads(config.read_text()).get("algo") if config.is_file() else None
    return sweep_figure(scores, stats, f"{algo} sweep" if algo else "")


def _redraw_profile(directory: Path, metric, estimators):
    from rl_pg.runs import aggregate

    scores, _ = sweep_scores(directory)
    feature = "rl-pg plot --figure performance_profile"
    return profile_figure(aggregate.performance_profiles(scores, feature=feature))


def _redraw_staleness(directory: Path, metric, estimators):
    rows = _pick(_study_rows(directory), estimators)
    return staleness_figure(rows, "lag_checkpoints" in rows[0])


_REDRAW = {
    "vs_staleness": _redraw_staleness,
    "along_training": _redraw_along_training,
    "decomposition": _redraw_decomposition,
    "sweep": _redraw_sweep,
    "performance_profile": _redraw_profile,
}


# ------------------------------------------------------- performance profiles


def profile_figure(profile: dict[str, Any], xlabel: str = "held-out score (pipes)"):
    """Performance profiles (Agarwal et al. 2021): the fraction of runs scoring
    above tau, one line per group with its 95% bootstrap band
    (:func:`rl_pg.runs.aggregate.performance_profiles`' output)."""
    plt = pyplot()
    taus = np.asarray(profile["taus"], float)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.5, 2.8), layout="constrained")
        for i, (name, y) in enumerate(profile["profiles"].items()):
            color = OKABE_ITO[i % len(OKABE_ITO)]
            style = LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)]
            ax.plot(
                taus,
                y,
                color=color,
                linestyle=style,
                label=name,
                gid=f"series:profile:{name}",
            )
            ax.fill_between(
                taus,
                profile["lo"][name],
                profile["hi"][name],
                color=color,
                alpha=0.15,
                lw=0,
            )
        ax.set_xlabel(xlabel + r" $\tau$")
        ax.set_ylabel(r"fraction of runs with score $> \tau$")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.25, lw=0.5)
        ax.legend(frameon=False)
    return fig
