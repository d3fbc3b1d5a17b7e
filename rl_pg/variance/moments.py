"""Per-trajectory moments of the reference sample, merged chunk by chunk.

Each chunk of per-trajectory gradients is reduced to O(P) sums where its
gradients are (:func:`chunk_sums`), then merged in float64 on the host with Chan
et al. 1979's parallel update (:class:`TrajectoryMoments`). From them: the
reference gradient (:func:`reference_gradient`), the per-trajectory variances of
the constant baselines and the critic's calibration (:func:`critic_calibration`).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ------------------------------------------------------ per-trajectory moments


ORACLE_SCALAR = "oracle optimal scalar b* (from the reference sample)"
ORACLE_PER_PARAMETER = "oracle optimal per-parameter b* (from the reference sample)"


@dataclasses.dataclass
class TrajectoryMoments:
    """Running float64 moments of per-trajectory quantities (Chan's update).

    ``mean``/``m2`` hold, per estimator (the study keeps reward-to-go's), the mean
    and the sum of squared deviations of the per-trajectory estimates; ``sums``
    the raw sums needed for the constant-baseline analysis (s = per-trajectory
    score, R = return).
    """

    count: int = 0
    mean: dict = dataclasses.field(default_factory=dict)
    m2: dict = dataclasses.field(default_factory=dict)
    sums: dict = dataclasses.field(default_factory=dict)
    # per reference group k (whole levels): sum_i R_i s_i and sum_i s_i, [P] each
    group_R_s: list = dataclasses.field(default_factory=list)
    group_s: list = dataclasses.field(default_factory=list)
    group_count: list = dataclasses.field(default_factory=list)

    def update(self, chunk: dict[str, np.ndarray], sums: dict[str, np.ndarray]):
        """Merge a chunk: ``chunk[name]`` is [C, P] per-trajectory estimates."""
        n_b = next(iter(chunk.values())).shape[0]
        means, m2s = {}, {}
        for name, values in chunk.items():
            values = np.asarray(values, np.float64)
            means[name] = values.mean(0)
            m2s[name] = ((values - means[name]) ** 2).sum(0)
        self.merge(n_b, means, m2s, sums)

    def merge(
        self,
        n_b: int,
        means: dict[str, np.ndarray],
        m2s: dict[str, np.ndarray],
        sums: dict[str, np.ndarray],
    ):
        """Merge a chunk of ``n_b`` trajectories given by its per-estimator means
        and sums of squared deviations [P] (Chan et al.'s pairwise update)."""
        n_a, n = self.count, self.count + n_b
        for name, mean_b in means.items():
            mean_b = np.asarray(mean_b, np.float64)
            m2_b = np.asarray(m2s[name], np.float64)
            if n_a == 0:
                self.mean[name], self.m2[name] = mean_b, m2_b
            else:
                delta = mean_b - self.mean[name]
                self.mean[name] = self.mean[name] + delta * n_b / n
                self.m2[name] = self.m2[name] + m2_b + delta**2 * n_a * n_b / n
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + np.asarray(value, np.float64)
        self.count = n

    def trace_variance(self, name: str) -> float:
        """tr Cov of one per-trajectory estimate (unbiased)."""
        return float(self.m2[name].sum() / max(self.count - 1, 1))

    def baseline_variances(self) -> dict[str, float]:
        """Per-trajectory tr Var[(R - b) s] for the constant baselines b.

        tr Var = sum_k E[(R - b_k)^2 s_k^2] - ||E[(R - b) s]||^2, from raw moments.
        """
        e = {k: v / self.count for k, v in self.sums.items()}
        mean_r = float(e["R"])
        scalar = float(e["R_s2"].sum() / max(e["s2"].sum(), 1e-300))
        per_param = np.where(e["s2"] > 0, e["R_s2"] / np.maximum(e["s2"], 1e-300), 0.0)
        out = {}
        for label, b in (
            ("reinforce (b = 0)", 0.0),
            ("constant b = E[R]", mean_r),
            (ORACLE_SCALAR, scalar),
            (ORACLE_PER_PARAMETER, per_param),
        ):
            second = e["R2_s2"] - 2 * b * e["R_s2"] + b**2 * e["s2"]
            first = e["R_s"] - b * e["s"]
            out[label] = float(second.sum() - (first**2).sum())
        return out


class ChunkSums(NamedTuple):
    """One chunk's reductions of its per-trajectory gradients (see :func:`chunk_sums`).

    Products with the return are taken about the chunk's mean return c
    (d_i = R_i - c): when returns hardly vary (a policy that always survives the
    horizon), float32 sums of R s would lose the small differences that the
    constant baselines' variances and the reference's mean-return baseline are
    made of; the host adds c back in float64 (:meth:`raw_sums`).
    """

    returns: jax.Array  # [C] R_i
    shift: jax.Array  # [] c, the chunk's mean return
    s: jax.Array  # [P] sum_i s_i
    d_s: jax.Array  # [P] sum_i d_i s_i
    group_s: jax.Array  # [groups, P] sum_i s_i per reference group
    group_d_s: jax.Array  # [groups, P] sum_i d_i s_i per reference group
    s2: jax.Array  # [P] sum_i s_i^2
    d_s2: jax.Array  # [P] sum_i d_i s_i^2
    d2_s2: jax.Array  # [P] sum_i d_i^2 s_i^2
    rtg_mean: jax.Array  # [P] mean of the reward-to-go gradients
    rtg_m2: jax.Array  # [P] their sum of squared deviations from it

    def raw_sums(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Host float64: the sums of :class:`TrajectoryMoments` (R, R^2, s, s^2,
        R s, R s^2, R^2 s^2), and per group sum R s [groups, P] and sum s."""
        c = np.float64(self.shift)
        f = {k: np.asarray(v, np.float64) for k, v in self._asdict().items()}
        sums = {
            "R": f["returns"].sum(),
            "R2": (f["returns"] ** 2).sum(),
            "s": f["s"],
            "s2": f["s2"],
            "R_s": f["d_s"] + c * f["s"],
            "R_s2": f["d_s2"] + c * f["s2"],
            "R2_s2": f["d2_s2"] + 2 * c * f["d_s2"] + c**2 * f["s2"],
        }
        return sums, f["group_d_s"] + c * f["group_s"], f["group_s"]


def chunk_sums(
    score: jax.Array, rtg: jax.Array, returns: jax.Array, group_len: int
) -> ChunkSums:
    """A chunk's per-trajectory moments, reduced where the gradients are.

    Every sum over trajectories is a product [k, C] x [C, P] with a few per-row
    weights (1, d_i, d_i^2, group indicators), one pass over each [C, P] array,
    and the reward-to-go gradients' deviations are taken from their mean (two
    passes), so the host accumulates O(P) float64 values per chunk instead of two
    [C, P] arrays.

    Args:
      score: [C, P] per-trajectory scores s_i.
      rtg: [C, P] per-trajectory reward-to-go gradients.
      returns: [C] R_i.
      group_len: trajectories per reference group (divides C; whole levels).

    Returns:
      :class:`ChunkSums`.
    """
    num = returns.shape[0]
    if group_len < 1 or num % group_len:
        raise ValueError(f"group_len ({group_len}) must divide the chunk ({num})")
    groups = num // group_len
    # full float32 products (accelerators default to TF32 / bfloat16 passes)
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    shift = jnp.mean(returns)
    d = returns - shift
    ones = jnp.ones_like(d)
    in_group = (jnp.arange(num) // group_len == jnp.arange(groups)[:, None]).astype(
        score.dtype
    )  # [groups, C]
    linear = dot(
        jnp.concatenate([ones[None], d[None], in_group, in_group * d], 0), score
    )
    square = dot(jnp.stack([ones, d, jnp.square(d)]), jnp.square(score))
    rtg_mean = jnp.mean(rtg, 0)
    return ChunkSums(
        returns=returns,
        shift=shift,
        s=linear[0],
        d_s=linear[1],
        group_s=linear[2 : 2 + groups],
        group_d_s=linear[2 + groups :],
        s2=square[0],
        d_s2=square[1],
        d2_s2=square[2],
        rtg_mean=rtg_mean,
        rtg_m2=dot(ones, jnp.square(rtg - rtg_mean)),
    )


def critic_calibration(sums: np.ndarray) -> dict[str, float]:
    """Mean V, mean discounted return-to-go and their correlation over live steps."""
    n, v, g, vv, gg, vg = (float(x) for x in sums)
    mean_v, mean_g = v / n, g / n
    var_v, var_g = vv / n - mean_v**2, gg / n - mean_g**2
    cov = vg / n - mean_v * mean_g
    corr = cov / np.sqrt(var_v * var_g) if var_v > 0 and var_g > 0 else float("nan")
    return {"mean_value": mean_v, "mean_return_to_go": mean_g, "correlation": corr}


def reference_gradient(moments: TrajectoryMoments) -> tuple[np.ndarray, np.ndarray]:
    """The "true" gradient as K group means Y_k [K, P] (g_ref = their mean) and
    g_ref itself.

    Y_k = (1/n_k) sum_{i in k} (R_i - b) s_i with b = the whole sample's mean
    return: REINFORCE with the mean-return baseline, whose per-trajectory variance
    is a few percent of plain REINFORCE's on Flappy Bird, so the reference is
    several times more precise for the same N. Using the sample's own mean adds a
    bias of order 1/N (-Cov(R, s) / N), far below the standard error. Groups hold
    whole levels, so the G correlated rollouts of a level stay in one group and
    se_ref^2 = tr S_Y / K (see :mod:`rl_pg.variance.statistics`) treats levels as
    clusters; treating trajectories as independent would understate it by the
    factor 1 + (G - 1) rho.
    """
    b = moments.sums["R"] / moments.count
    count = np.asarray(moments.group_count, np.float64)[:, None]
    groups = (np.stack(moments.group_R_s) - b * np.stack(moments.group_s)) / count
    return groups, groups.mean(0)
