"""Deliberate bugs in the core modules, and whether the test suite catches each one.

Each mutant replaces one exact piece of source (it must occur once) in a copy of
the repository and runs the test files that cover it (``pytest -x``, one process):
"caught" when a test fails (or errors, as a bug that breaks an import does),
"missed" when every test passes. A missed mutant is a
test to write, or an equivalent mutant (the same behaviour: say why in the docs).
Writes ``mutants.md`` (a table) and ``mutants.json``; the repository is not touched.
About 35 minutes for all of them on the 2-core CPU (a caught one stops at its first
failure; a missed one runs its files to the end).

    nice python experiments/mutants.py --out runs/mutants [--only NAME ...]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from rl_pg import io

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("rl_pg", "tests", "experiments", "pyproject.toml", "README.md", "docs")


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str  # occurs exactly once in path
    new: str
    tests: str  # space-separated test files (or node ids)


RETURNS = "tests/test_returns.py tests/test_estimators.py tests/test_rollout.py"
LOSSES = "tests/test_estimators.py tests/test_offpolicy.py tests/test_lag.py"
STATS = "tests/test_calibration.py tests/test_variance.py tests/test_decomposition.py"
ENV = "tests/test_flappy_bird.py tests/test_parity.py"
LAG = "tests/test_lag.py tests/test_lag_study.py"
QL, DQN = "tests/test_qlearning.py", "tests/test_dqn.py tests/test_replay.py"
PG = "rl_pg/estimators.py"
REPORT = "rl_pg/variance/report.py"
REPORT_TESTS = "tests/test_variance_report.py tests/test_variance.py"

MUTANTS = [
    Mutant("reward_to_go ignores done", "rl_pg/returns.py",
           "g_t = r_t + jnp.where(done_t, 0.0, g_next)", "g_t = r_t + g_next", RETURNS),
    Mutant("total_return ignores done", "rl_pg/returns.py",
           "past_next = jnp.where(done_t, 0.0, past_t + r_t)",
           "past_next = past_t + r_t", RETURNS),
    Mutant("discounted return never bootstraps", "rl_pg/returns.py",
           "future = jnp.where(trunc_t, nv_t, g_next)", "future = g_next", RETURNS),
    Mutant("GAE without lambda", "rl_pg/returns.py",
           "jnp.where(done_t, 0.0, gamma * lam * a_next)",
           "jnp.where(done_t, 0.0, gamma * a_next)", RETURNS),
    Mutant("GAE bootstraps from values[t+1] at truncations", "rl_pg/returns.py",
           "return jnp.where(truncated, next_values, shifted)", "return shifted",
           RETURNS),
    Mutant("per-trajectory mean over steps", PG,
           "return jnp.sum(_zero_padding(x, mask)) / mask.shape[1]",
           "return jnp.sum(_zero_padding(x, mask)) / mask.shape[0]", LOSSES),
    Mutant("RLOO divides by G", PG,
           "_group_sum_others(total, group_size) / (size - 1)",
           "_group_sum_others(total, group_size) / size", LOSSES),
    Mutant("PPO clips at 1 + 2 eps", PG,
           "jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages",
           "jnp.clip(ratio, 1.0 - clip_eps, 1.0 + 2 * clip_eps) * advantages", LOSSES),
    Mutant("dual clip takes the min", PG,
           "jnp.maximum(objective, dual_clip * advantages)",
           "jnp.minimum(objective, dual_clip * advantages)", LOSSES),
    Mutant("advantage normalisation without centring", PG,
           "return (x - mean) / (jnp.sqrt(var) + eps)",
           "return x / (jnp.sqrt(var) + eps)", LOSSES),
    Mutant("trajectory ratio is a mean", PG,
           "rho = jnp.exp(jnp.sum(log_ratio, axis=0))",
           "rho = jnp.exp(jnp.mean(log_ratio, axis=0))", LOSSES),
    Mutant("per-decision ratio leaves out the current step", PG,
           "jnp.exp(jnp.cumsum(log_ratio, axis=0))",
           "jnp.exp(jnp.cumsum(log_ratio, axis=0) - log_ratio)", LOSSES),
    Mutant("truncation at 2 c", PG,
           "jnp.minimum(log_ratio, jnp.log(truncation))",
           "jnp.minimum(log_ratio, jnp.log(2 * truncation))", LOSSES),
    Mutant("V-trace traces untruncated", PG,
           "gamma * lam * jnp.minimum(c_bar, rho))", "gamma * lam * rho)", LOSSES),
    Mutant("V-trace policy ratio untruncated", PG,
           "advantage = jnp.minimum(pg_rho_bar, rho) * (",
           "advantage = rho * (", LOSSES),
    Mutant("CISPO weight unclipped", PG,
           "weight = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)",
           "weight = ratio", LOSSES),
    Mutant("reference KL k3 without - log r", PG,
           "return jnp.exp(log_ratio) - log_ratio - 1.0",
           "return jnp.exp(log_ratio) - 1.0", LOSSES),
    Mutant("live-step mean over every step", PG,
           "jnp.sum(_zero_padding(x, mask)) / jnp.maximum(jnp.sum(mask), 1.0)",
           "jnp.sum(_zero_padding(x, mask)) / mask.size", LOSSES),
    Mutant("optimal baseline loses its shift", PG,
           "return jnp.where(den > 0, shift + _safe_div(num, den), 0.0)",
           "return jnp.where(den > 0, _safe_div(num, den), 0.0)", LOSSES),
    Mutant("entropy of the wrong sign", "rl_pg/policies.py",
           "return -jnp.sum(probs * safe_log_pi, axis=-1)",
           "return jnp.sum(probs * safe_log_pi, axis=-1)",
           LOSSES + " tests/test_policies.py"),
    Mutant("KL(pi || mu) for KL(mu || pi)", "rl_pg/variance/lag.py",
           "mu * (log_mu - log_pi)", "jnp.exp(log_pi) * (log_pi - log_mu)", LAG),
    Mutant("Kish ESS without the square", "rl_pg/variance/lag.py",
           "total**2 / jnp.sum(w * w)", "total / jnp.sum(w * w)", LAG),
    Mutant("jackknife factor a / (a - 1)", "rl_pg/variance/statistics.py",
           "        var += (a - 1) / a * np.sum((part - part.mean()) ** 2)\n",
           "        var += a / (a - 1) * np.sum((part - part.mean()) ** 2)\n", STATS),
    Mutant("bias2 keeps the reference's noise", "rl_pg/variance/statistics.py",
           '"bias2": xx - 2 * xy + yy - tr_x / nx - se2,',
           '"bias2": xx - 2 * xy + yy - tr_x / nx,', STATS),
    Mutant("variance with ddof 0", "rl_pg/variance/statistics.py",
           '(_diag_sums(dx, "x", K) - nx * xx) / (nx - 1)',
           '(_diag_sums(dx, "x", K) - nx * xx) / nx', STATS),
    Mutant("one-sided tail in the skewed quantiles", "rl_pg/variance/statistics.py",
           "    tail = (1 - level) / 2\n", "    tail = 1 - level\n", STATS),
    Mutant("degenerate part's cross term halved", "rl_pg/variance/statistics.py",
           "+ 4 * tr_xy / (M * K)", "+ 2 * tr_xy / (M * K)", STATS),
    Mutant("exact bias2 halved", "rl_pg/variance/exact.py",
           'out["bias2"] = float(np.sum((mu - g) ** 2))',
           'out["bias2"] = float(np.sum((mu - g) ** 2) / 2)', STATS),
    Mutant("decomposition's trajectory part with ddof 0",
           "rl_pg/variance/decomposition.py",
           "jnp.mean(gg * a.var(-1, ddof=1), -1)", "jnp.mean(gg * a.var(-1), -1)",
           STATS),
    Mutant("chunked moments merged without the between part",
           "rl_pg/variance/moments.py",
           "self.m2[name] + m2_b + delta**2 * n_a * n_b / n", "self.m2[name] + m2_b",
           STATS),
    Mutant("gravity while flapping", "rl_pg/envs/flappy_bird.py",
           "falls = (vel < params.max_fall_vel) & ~flapped",
           "falls = vel < params.max_fall_vel", ENV),
    Mutant("ground crash a pixel late", "rl_pg/envs/flappy_bird.py",
           ">= params.ground_y - 1.0", ">= params.ground_y", ENV),
    Mutant("no top penalty", "rl_pg/envs/flappy_bird.py",
           "r = jnp.where(bird_y < 0, params.reward_top, r)", "r = r", ENV),
    Mutant("rotation stops one step late", "rl_pg/envs/flappy_bird.py",
           "jnp.where(bird_rot > params.min_rot,", "jnp.where(bird_rot >= params.min_rot,",
           ENV),
    Mutant("gap bottom scaled by the width", "rl_pg/envs/flappy_bird.py",
           "jnp.where(hidden, h, gap_top + params.pipe_gap) / h,",
           "jnp.where(hidden, h, gap_top + params.pipe_gap) / w,", ENV),
    Mutant("rollout terminates after the end", "rl_pg/rollout.py",
           "terminated=terminated & alive,", "terminated=terminated,", RETURNS),
    Mutant("rollout's horizon is no cut", "rl_pg/rollout.py",
           '.at[-1].set(out["truncated"][-1] | alive)', "", RETURNS),
    Mutant("next values shifted the wrong way", "rl_pg/rollout.py",
           "jnp.concatenate([values[1:], last[None]], axis=0)",
           "jnp.concatenate([values[:-1], last[None]], axis=0)", RETURNS),
    Mutant("greedy ties flap", "rl_pg/algos/qlearning.py",
           "(q_rows[..., 1] > q_rows[..., 0])", "(q_rows[..., 1] >= q_rows[..., 0])", QL),
    Mutant("TD target bootstraps past a termination", "rl_pg/algos/qlearning.py",
           "return rewards + gamma * jnp.where(terminated, 0.0, bootstrap)",
           "return rewards + gamma * bootstrap", QL),
    Mutant("Q-learning step size 1", "rl_pg/algos/qlearning.py",
           "set(current + alpha * (mean_target - current))", "set(mean_target)", QL),
    Mutant("double DQN bootstraps from the max", "rl_pg/algos/dqn.py",
           "return reward + discount * q_next_target[best]",
           "return reward + discount * jnp.max(q_next_target)", DQN),
    Mutant("n-step discount without gamma per step", "rl_pg/algos/dqn.py",
           "jnp.where(cut_here, own, gamma * discount_after)",
           "jnp.where(cut_here, own, discount_after)", DQN),
    Mutant("Polyak update towards the target", "rl_pg/algos/dqn.py",
           "incremental_update(params, learner.target_params, config.tau)",
           "incremental_update(learner.target_params, params, config.tau)", DQN),
    Mutant("replay never full", "rl_pg/replay.py",
           "size=jnp.minimum(state.size + batch, capacity),",
           "size=jnp.minimum(state.size + batch, capacity - 1),", DQN),
    Mutant("median known one rank early", "rl_pg/evaluate.py",
           "(num_episodes + 1) // 2, num_episodes // 2 + 1",
           "(num_episodes + 1) // 2, num_episodes // 2", "tests/test_evaluate.py " + QL),
    Mutant("lag report's best is the worst", "rl_pg/variance/lag_report.py",
           'best = min(found, key=lambda r: r["mse"] if math.isfinite(r["mse"]) '
           "else np.inf)",
           'best = max(found, key=lambda r: r["mse"] if math.isfinite(r["mse"]) '
           "else -np.inf)", LAG),
    Mutant("crossover at the last KL", "rl_pg/variance/lag_report.py",
           "            r = over[0]\n", "            r = over[-1]\n", LAG),
    Mutant("report's lowest relative variance is the highest", REPORT,
           'best = min(finite, key=lambda r: r["rel_variance"])',
           'best = max(finite, key=lambda r: r["rel_variance"])', REPORT_TESTS),
    Mutant("tilted below 0.9", REPORT, 'r["cos_mean_hi"] < 0.99',
           'r["cos_mean_hi"] < 0.9', REPORT_TESTS),
    Mutant("stage table without the smallest size", REPORT,
           "not in (smallest, largest):", "not in (largest,):", REPORT_TESTS),
    Mutant("interval ends swapped", REPORT, 'for s in ("lo", "hi"))',
           'for s in ("hi", "lo"))', REPORT_TESTS),
    Mutant("crossover significant without the lower end",
           "rl_pg/variance/lag_report.py",
           'sure = r["bias2_lo"] > r["variance_hi"]',
           'sure = r["bias2"] > r["variance_hi"]', LAG),
]  # fmt: skip


def check(mutants: list[Mutant], root: Path = ROOT) -> None:
    """Each mutant changes its file and its text occurs there exactly once."""
    names = [m.name for m in mutants]
    if len(set(names)) < len(names):
        raise ValueError("two mutants share a name")
    for m in mutants:
        count = (root / m.path).read_text().count(m.old)
        if count != 1 or m.old == m.new:
            raise ValueError(f"mutant {m.name!r}: its text occurs {count} times")
        for test in m.tests.split():  # files, or pytest node ids
            if not (root / test.split("::")[0]).is_file():
                raise ValueError(f"mutant {m.name!r}: no test file {test}")


def run(mutant: Mutant, copy: Path) -> dict:
    """Apply ``mutant`` in ``copy``, run its tests, restore the file."""
    path = copy / mutant.path
    source = path.read_text()
    start = time.perf_counter()
    try:
        path.write_text(source.replace(mutant.old, mutant.new))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
             *mutant.tests.split()],
            cwd=copy,
            env={**os.environ, "PYTHONPATH": str(copy)},
            capture_output=True,
            text=True,
        )  # fmt: skip
    finally:
        path.write_text(source)
    lines = result.stdout.splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    if result.returncode not in (0, 1, 2):  # 2: interrupted (a collection error)
        raise RuntimeError(f"{mutant.name}: pytest exited {result.returncode}")
    return {
        "name": mutant.name,
        "path": mutant.path,
        "caught": result.returncode != 0,
        "by": failed[0].split()[1] if failed else "",
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(results: list[dict]) -> str:
    caught = sum(r["caught"] for r in results)
    lines = [
        f"{caught} of {len(results)} mutants caught.",
        "",
        "| mutant | file | caught by | s |",
        "|---|---|---|---|",
    ]
    for r in results:
        by = f"`{r['by']}`" if r["caught"] else "**missed**"
        lines.append(f"| {r['name']} | {r['path']} | {by} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these mutants")
    args = parser.parse_args(argv)
    check(MUTANTS)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) < len(set(args.only)):
        raise SystemExit(f"unknown mutant in {args.only}; see MUTANTS")
    out = io.new_out_dir(args.out)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(
                    src, copy / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            elif src.is_file():
                shutil.copy2(src, copy / name)
        for mutant in chosen:
            results.append(run(mutant, copy))
            io.write_json(out / "mutants.json", results)  # kept if stopped
            r = results[-1]
            print(
                f"{'caught' if r['caught'] else 'MISSED'} {r['name']} ({r['seconds']} s)"
            )
    text = table(results)
    io.atomic_write_text(out / "mutants.md", text)
    print(text)
    return results


if __name__ == "__main__":
    main()
