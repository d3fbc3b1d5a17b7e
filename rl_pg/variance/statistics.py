"""Calibrated statistics of M batch estimates against a noisy reference gradient.

Setting (REFERENCE.md s. 11): batch estimates X_1..X_M in R^P, i.i.d. with mean mu and
covariance Sigma, and a reference made of K i.i.d. group means Y_1..Y_K with mean g
(each group holds whole levels, so levels are the clusters), g_ref = Ybar. Every
metric is built from unbiased U-statistic pieces:

  tr S_X = (1/(M-1)) sum ||X_m - Xbar||^2          unbiased for tr Sigma  (variance)
  se_ref^2 = tr S_Y / K                            unbiased for E||g_ref - g||^2
  bias2 = ||Xbar - Ybar||^2 - tr S_X / M - se_ref^2 unbiased for ||mu - g||^2 (may be < 0)
  mse = mean_m ||X_m - Ybar||^2 - se_ref^2          unbiased for E||X - g||^2
  |mu|^2 = ||Xbar||^2 - tr S_X / M,  |g|^2 = ||Ybar||^2 - se_ref^2
  snr = sqrt(max(|mu|^2, 0) / tr S_X),   rel_variance = tr S_X / |mu|^2 (= 1 / snr^2)
  cos_mean = <Xbar, Ybar> / sqrt(|mu|^2 |g|^2) - jackknife bias (direction of the
             mean estimate; noise-corrected norms), clamped to [-1, 1]
  cos_true = mean_m cos(X_m, g_ref),  cos_pairwise = mean_{m != m'} cos(X_m, X_m')

The plug-in ||Xbar - g_ref||^2 would carry the noise terms; ``bias2_noise`` = tr S_X / M
+ se_ref^2 is what it adds for an unbiased estimator. cos_mean, rel_variance, snr,
cos_true and cos_pairwise do not change when an estimator is multiplied by a constant.

Intervals: the delete-one jackknife over both independent samples (Efron & Stein
1981; Arvesen 1969 for two-sample U-statistics),

  Var_J(theta) = (M-1)/M sum_m (theta_(-m) - theta_(.m))^2   (each batch deleted)
               + (K-1)/K sum_k (theta_(-k) - theta_(.k))^2   (each reference group),

and a normal interval theta +- z sqrt(Var_J); for the positive, right-skewed variance
and mse, theta exp(-+ t se_log) with se_log the jackknife s.e. of log theta and t a
Student quantile at its Satterthwaite degrees of freedom (few when rare long
episodes or large importance weights dominate). For bias2 the jackknife counts the degenerate
(second-order) part of the U-statistic's variance twice, which dominates at an
unbiased estimator; it is subtracted with an unbiased estimate of it
(:func:`trace_sigma_squared`), flooring the variance at that degenerate part, and
the interval follows the law of point - bias2, a normal first-order part plus a
right-skewed sum of chi-squares (:func:`_bias2_interval`): the longer half lies
below the point (rare large overestimates), and the upper bound is a score-type
inversion whose variance grows with bias2. It is continuous in its inputs.
cos_mean is a ratio whose first-order term vanishes when mu is parallel to g, so its
O(1/M + 1/K) bias is as large as its spread there: the point is shifted by
the two-sample jackknife bias estimate (Quenouille 1956). Its interval is bias2's
for the unit-scaled estimates projected off the mean direction, halved and mirrored
(2 (1 - cos) is their bias2; :func:`_cos_mean_half_widths`): long above the point;
its lower half starts from the point clamped to 1 (a point above 1 is noise; from
the unclamped point the interval [lo, 1] missed true cosines just below 1). Every
cosine's point
and interval are then clamped to [-1, 1]: clamping an interval does not change
whether it holds a truth in [-1, 1], so coverage at the truth cos = 1 (an
unbiased estimator) stays measurable (hi = 1 holds it).
SNR and rel_variance come from one interval on
snr^2 = |mu|^2 / tr S_X. A percentile bootstrap is wrong here: resampling adds
the noise term again (its bias2 distribution centres near B + tr S/M) and
shrinks tr S by (M-1)/M, which in P ~ 10^4 dimensions puts both intervals beside
the truth. The coverage of these intervals is measured against exact values in
``tests/test_calibration.py`` and ``experiments/calibration.py``.
"""

from statistics import NormalDist

import numpy as np
from scipy import special
from scipy.stats import t as student_t

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
LOG_SCALE = frozenset({"variance", "mse"})
# bias2's interval (see _bias2_interval): the first-order variance at bias2 = theta
# is modelled as FIRST_ORDER_FACTOR * theta * D / tr C (1.5: between the 1 of a
# noise-like bias direction and the 2 of a noncentral chi-square; set on the
# exact-mode calibration, experiments/calibration.py), and skew <= sqrt(8) (chi2_1)
FIRST_ORDER_FACTOR = 1.5
SKEW_CAP = float(np.sqrt(8.0))
# cos_mean's interval (_cos_mean_half_widths): the same model with factor 1 (a
# noise-like direction; 1.5 made its lower half ~4x the spread on the calibration)
COS_FIRST_ORDER_FACTOR = 1.0


def _replicates(full: float, deleted_x, deleted_y) -> np.ndarray:
    """[1 + M + K]: the full-sample value, then each X row deleted, then each Y row."""
    return np.concatenate([[full], deleted_x, deleted_y])


def _gram_sums(K: np.ndarray, own: str, other_len: int) -> np.ndarray:
    """Sum of a one-sample Gram matrix's entries over kept rows, per replicate.

    ``own`` says whether K belongs to X (deletions come first) or Y.
    """
    total = K.sum()
    deleted = total - 2 * K.sum(1) + np.diag(K)
    unchanged = np.full(other_len, total)
    if own == "x":
        return _replicates(total, deleted, unchanged)
    return _replicates(total, unchanged, deleted)


def _diag_sums(d: np.ndarray, own: str, other_len: int) -> np.ndarray:
    total = d.sum()
    unchanged = np.full(other_len, total)
    if own == "x":
        return _replicates(total, total - d, unchanged)
    return _replicates(total, unchanged, total - d)


def _metrics(Kxx, Kxy, Kyy) -> dict[str, np.ndarray]:
    """Every metric per replicate (full sample, then delete-one), from Gram matrices.

    O(M^2 + K^2 + M K): deleting one row changes each sum by its row's terms.
    """
    M, K = Kxy.shape
    nx = _replicates(M, np.full(M, M - 1), np.full(K, M))
    ny = _replicates(K, np.full(M, K), np.full(K, K - 1))
    dx, dy = np.diag(Kxx), np.diag(Kyy)
    xx = _gram_sums(Kxx, "x", K) / nx**2
    yy = _gram_sums(Kyy, "y", M) / ny**2
    total = Kxy.sum()
    xy = _replicates(total, total - Kxy.sum(1), total - Kxy.sum(0)) / (nx * ny)
    tr_x = (_diag_sums(dx, "x", K) - nx * xx) / (nx - 1)
    se2 = (_diag_sums(dy, "y", M) - ny * yy) / (ny - 1) / ny
    mu2 = xx - tr_x / nx
    g2 = yy - se2
    # cos_true = mean_m cos(X_m, Ybar) for every replicate
    norms = np.sqrt(np.maximum(dx, 1e-300))  # a zero row's cosines are 0
    row = Kxy.sum(1)  # <X_m, sum_k Y_k>
    cos_full = row / K / (norms * np.sqrt(max(yy[0], 1e-300)))
    dot_del = (row[:, None] - Kxy) / (K - 1)  # [M, K]: <X_m, Ybar_(-k)>
    cos_del = dot_del / (norms[:, None] * np.sqrt(np.maximum(yy[1 + M :], 1e-300)))
    cos_true = _replicates(
        cos_full.mean(), (cos_full.sum() - cos_full) / (M - 1), cos_del.mean(0)
    )
    C = Kxx / np.outer(norms, norms)
    pairs = _gram_sums(C, "x", K) - _diag_sums(np.diag(C), "x", K)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "bias2": xx - 2 * xy + yy - tr_x / nx - se2,
            "variance": tr_x,
            "mse": _diag_sums(dx, "x", K) / nx - 2 * xy + yy - se2,
            "cos_true": cos_true,
            "cos_pairwise": pairs / (nx * (nx - 1)),
            "snr2": mu2 / tr_x,
            "cos_mean": np.where(
                (mu2 > 0) & (g2 > 0), xy / np.sqrt(np.abs(mu2 * g2)), np.nan
            ),
            "bias2_noise": tr_x / nx + se2,
            "se_ref2": se2,
            "mu2": mu2,
            "g2": g2,
        }


def trace_sigma_squared(gram: np.ndarray) -> float:
    """Unbiased tr(Sigma^2) from the Gram matrix X X^T of M >= 4 i.i.d. rows.

    Chen, Zhang & Zhong 2010 (JASA 105): sums of products of Gram entries over
    distinct indices, T = S2 / M_(2) - 2 S3 / M_(3) + S4 / M_(4) (falling factorials).
    """
    M = gram.shape[0]
    off = gram - np.diag(np.diag(gram))
    s2 = np.sum(off**2)
    s3 = np.sum(off.sum(1) ** 2 - (off**2).sum(1))
    s4 = off.sum() ** 2 - 2 * s2 - 4 * s3
    p2 = M * (M - 1)
    p3, p4 = p2 * (M - 2), p2 * (M - 2) * (M - 3)
    return float(s2 / p2 - 2 * s3 / p3 + s4 / p4)


def _degenerate_part(Kxx, Kxy, Kyy) -> float:
    """The second-order (degenerate) variance of the bias2 U-statistic,

    2 tr(Sx^2) / (M (M-1)) + 2 tr(Sy^2) / (K (K-1)) + 4 tr(Sx Sy) / (M K),

    which the jackknife counts twice (Efron & Stein 1981): at an unbiased
    estimator the first-order part vanishes and the jackknife interval alone
    would cover ~99.5% instead of 95%.
    """
    M, K = Kxy.shape
    cross = Kxy - Kxy.mean(0) - Kxy.mean(1)[:, None] + Kxy.mean()
    tr_xy = np.sum(cross**2) / ((M - 1) * (K - 1))
    return (
        2 * trace_sigma_squared(Kxx) / (M * (M - 1))
        + 2 * trace_sigma_squared(Kyy) / (K * (K - 1))
        + 4 * tr_xy / (M * K)
    )


def skewed_quantiles(var: float, kappa3: float, level: float) -> tuple[float, float]:
    """The (1 -+ level) / 2 quantiles of a zero-mean W with variance ``var`` and
    third cumulant ``kappa3`` >= 0, as a shifted, scaled chi-square a (chi2_k - k)
    with those cumulants (k = 8 / skew^2, a = sqrt(var / (2 k)); Pearson type III).
    The skew is capped at ``SKEW_CAP`` = sqrt(8), a chi2_1's (the most a sum of independent
    squares has). Continuous in its inputs; normal as the skew -> 0."""
    sd = float(np.sqrt(max(var, 0.0)))
    if not sd > 0:
        return 0.0, 0.0
    skew = min(max(kappa3, 0.0) / sd**3, SKEW_CAP)
    k = min(8.0 / skew**2, 1e8) if skew > 0 else 1e8
    a = sd / np.sqrt(2 * k)
    tail = (1 - level) / 2
    lower = a * (2 * special.gammaincinv(k / 2, tail) - k)
    upper = a * (2 * special.gammaincinv(k / 2, 1 - tail) - k)
    return float(lower), float(upper)


def _jackknife_se(values: np.ndarray, num_x_units: int) -> float:
    """sqrt of the two-sample delete-a-group jackknife variance (rows 1..: deletions)."""
    parts = (values[1 : 1 + num_x_units], values[1 + num_x_units :])
    var = 0.0
    for part in parts:
        a = len(part)
        var += (a - 1) / a * np.sum((part - part.mean()) ** 2)
    return float(np.sqrt(var))


def _jackknife_df(values: np.ndarray, num_x_units: int) -> float:
    """Welch-Satterthwaite degrees of freedom of the two-sample jackknife variance.

    Each sample's part sum_a d_a^2 (d_a: deviations of its delete-one values) has
    df = 2 / Var(s^2 / sigma^2) ~ 2 a / (kurt - 1), kurt = a sum d^4 / (sum d^2)^2
    (a for normal data; heavy tails, as rare long episodes, give fewer), and
    df = V^2 / sum_parts V_part^2 / df_part.
    """
    parts = (values[1 : 1 + num_x_units], values[1 + num_x_units :])
    total, denom = 0.0, 0.0
    for part in parts:
        a = len(part)
        d2 = (part - part.mean()) ** 2
        v = (a - 1) / a * np.sum(d2)
        if not v > 0:
            continue
        kurt = a * np.sum(d2**2) / np.sum(d2) ** 2
        total += v
        denom += v**2 * max(kurt - 1, 2 / (a - 1)) / (2 * a)
    return float(total**2 / denom) if denom > 0 else np.inf


def summarize(
    estimates: np.ndarray,
    reference_groups: np.ndarray,
    level: float = 0.95,
    *,
    gram: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of M estimates [M, P] against K reference group means [K, P].

    Args:
      estimates: X, one batch estimate per row.
      reference_groups: Y, i.i.d. group means whose mean Ybar is the reference.
      level: nominal coverage of the ``*_lo`` / ``*_hi`` intervals.
      gram: X X^T [M, M] in float64 if the caller has it (the costly part in
        high dimension); computed here otherwise.

    Returns:
      Every metric of :data:`METRICS` with ``_lo`` / ``_hi``, plus ``bias2_noise``,
      ``se_ref`` (= sqrt(se_ref^2)) and ``mean_norm2`` (the unbiased ||mu||^2).
      Undefined values (a cosine of a zero vector, the SNR of an estimator that is
      always 0, as when every return is equal) are nan, without warnings.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _summarize(estimates, reference_groups, level, gram)


def _summarize(
    estimates: np.ndarray,
    reference_groups: np.ndarray,
    level: float = 0.95,
    gram: np.ndarray | None = None,
) -> dict[str, float]:
    """``summarize`` (numpy warnings of undefined values silenced by the caller)."""
    X = np.asarray(estimates, np.float64)
    Y = np.asarray(reference_groups, np.float64)
    M, K = X.shape[0], Y.shape[0]
    if M < 4 or K < 4:
        raise ValueError(
            f"need at least 4 batch estimates and 4 reference groups, got {M} and {K}"
        )
    Kxx = X @ X.T if gram is None else np.asarray(gram, np.float64)
    X, Kxx = flush_zero_estimates(X, Kxx)
    Kxy, Kyy = X @ Y.T, Y @ Y.T
    reps = _metrics(Kxx, Kxy, Kyy)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    out = {}
    for name in ("bias2", "variance", "mse", "cos_true", "cos_pairwise", "cos_mean"):
        values = reps[name]
        point = float(values[0])
        se = _jackknife_se(values, M)
        if name == "bias2":
            lo, hi = _bias2_interval(reps, Kxx, Kxy, Kyy, level)
        elif name in LOG_SCALE and point > 0:  # jackknife of log theta (or delta)
            logs = np.log(values) if np.all(values > 0) else values / point
            t = student_t.ppf(0.5 + level / 2, _jackknife_df(logs, M))
            se_log = _jackknife_se(logs, M)
            lo, hi = point * np.exp(-t * se_log), point * np.exp(t * se_log)
        else:
            lo, hi = point - z * se, point + z * se
        if name == "cos_mean":
            point -= _jackknife_bias(values, M)
            down, up = _cos_mean_half_widths(reps, Kxx, Kxy, Kyy, level)
            # the lower end from the point clamped to 1: above 1 is noise
            lo, hi = min(point, 1.0) + down, point + up
        if name == "cos_mean" and (hi < -1 or lo > 1):  # wholly outside: the
            lo, hi = -1.0, 1.0  # data do not fix it (not the certainty of [-1, -1])
        if name.startswith("cos"):  # cosines: point and interval in [-1, 1]
            point, lo, hi = (float(np.clip(v, -1, 1)) for v in (point, lo, hi))
        out |= {name: point, f"{name}_lo": float(lo), f"{name}_hi": float(hi)}
    out |= _snr_intervals(reps["snr2"], M, z, level)
    out["bias2_noise"] = float(reps["bias2_noise"][0])
    out["se_ref"] = float(np.sqrt(max(reps["se_ref2"][0], 0.0)))
    out["mean_norm2"] = float(reps["mu2"][0])
    return out


ZERO_TOLERANCE = 1e-5  # relative to the largest estimate's norm (float32 eps ~ 1e-7)


def flush_zero_estimates(X: np.ndarray, gram: np.ndarray) -> tuple:
    """X and X X^T with every estimate that is zero up to rounding set to exactly 0.

    A batch whose groups all have equal returns has estimate 0, but float32
    sums leave ~1e-9 of noise in a direction that depends on the reduction order
    (so on the device count), and its cosine would be arbitrary. An estimate
    whose norm is at most ``ZERO_TOLERANCE`` x the largest of the M norms is
    zero; the cosine of a zero vector is defined as 0.
    """
    norms2 = np.diag(gram)
    zero = norms2 <= ZERO_TOLERANCE**2 * np.max(norms2, initial=0.0)
    if not zero.any():
        return X, gram
    keep = (~zero).astype(np.float64)
    return X * keep[:, None], gram * np.outer(keep, keep)


def _bias2_interval(
    reps,
    Kxx,
    Kxy,
    Kyy,
    level: float,
    factor: float = FIRST_ORDER_FACTOR,
    ramp: bool = False,
) -> tuple[float, float]:
    """bias2's interval from the law of W = point - bias2 (REFERENCE.md s. 11).

    W ~ 2 d'e + (||e||^2 - tr C), e ~ N(0, C), d = mu - g: variance F + D (first-
    order part F = 4 d'C d, degenerate part D = 2 tr C^2), third cumulant
    8 tr C^3 + 24 d'C^2 d ~ D (2 D + 3 F) / tr C (Satterthwaite: C's spectrum acts
    like one scaled chi-square; tr C = ``bias2_noise``), skewed to the right
    (:func:`skewed_quantiles`). D is estimated without bias
    (:func:`_degenerate_part`); F by the jackknife less D (which it counts
    twice), floored at 0 and at what the same model gives at bias2 = theta,
    ~ ``FIRST_ORDER_FACTOR`` theta D / tr C: near a small point the jackknife's F is small too (it is
    built from the same d-hat), so both ends are score-type inversions: the
    upper solves theta + lower quantile of W(theta) = point, the lower
    theta + upper quantile of W(theta) = point (W's spread at a lower theta is
    smaller, so the lower half is tighter than the upper quantile at the point).
    Continuous in its inputs.
    """
    point = float(reps["bias2"][0])
    jack = _jackknife_se(reps["bias2"], Kxy.shape[0]) ** 2
    deg = _degenerate_part(Kxx, Kxy, Kyy)
    noise = float(reps["bias2_noise"][0])
    if not (deg > 0 and noise > 0):
        return point, point
    # Var >= the degenerate part: the floor matters in low effective dimension
    first_hat = max(jack - 2 * deg, 0.0)  # the jackknife counts D twice

    def quantiles(theta: float) -> tuple[float, float]:
        shrink = 1.0
        if ramp and theta < point:  # F = 4 d'C d scales with theta = |d|^2
            shrink = max(theta, 0.0) / point
        first = max(first_hat * shrink, factor * max(theta, 0.0) * deg / noise)
        kappa3 = deg * (2 * deg + 3 * first) / noise
        return skewed_quantiles(deg + first, kappa3, level)

    # test inversion on both sides: theta is in the interval when point lies
    # within W(theta)'s quantiles around it (the law's spread grows with theta)
    lo = _bisect(
        lambda t: t + quantiles(t)[1] - point, point - quantiles(point)[1], point
    )
    a, step = point, np.sqrt(deg + first_hat)
    b = a + step
    while b + quantiles(b)[0] < point:
        a, b, step = b, b + 2 * step, 2 * step
    return lo, _bisect(lambda t: t + quantiles(t)[0] - point, a, b)


def _cos_mean_half_widths(reps, Kxx, Kxy, Kyy, level: float) -> tuple[float, float]:
    """cos_mean's (-lower, upper) half-widths from bias2's law on unit-scaled data.

    With a = X / |mu|, b = Y / |g| and the bisector u of their means,
    ||mu / |mu| - g / |g|||^2 = 2 (1 - cos) is the bias2 of a against b, which lies
    off u; to second order cos_mean - cos = -(point - bias2) / 2 for the bias2
    U-statistic of the projected a, b (the parallel part's noise-corrected norms
    cancel at first order, and the jackknife bias shift removes its square). So
    the interval is bias2's (:func:`_bias2_interval`, skewed: rare large
    overestimates of bias2) on the projected Gram matrices, halved and mirrored:
    the long half lies above the point. At an unbiased estimator (cos = 1) the
    first-order part vanishes and the jackknife alone counts the degenerate part
    twice (intervals covering ~100%).
    """
    mu2, g2 = reps["mu2"][0], reps["g2"][0]
    if not (mu2 > 0 and g2 > 0):
        return np.nan, np.nan
    sx, sy = 1 / np.sqrt(mu2), 1 / np.sqrt(g2)
    ax = sx * (sx * Kxx.mean(1) + sy * Kxy.mean(1))  # <a_m, abar + bbar>
    by = sy * (sx * Kxy.mean(0) + sy * Kyy.mean(1))  # <b_k, abar + bbar>
    norm = np.sqrt(max(ax.mean() + by.mean(), 1e-300))  # |abar + bbar|
    px, py = ax / norm, by / norm  # components along u
    proj = (
        sx * sx * Kxx - np.outer(px, px),
        sx * sy * Kxy - np.outer(px, py),
        sy * sy * Kyy - np.outer(py, py),
    )
    theta = _metrics(*proj)
    point = float(theta["bias2"][0])
    lo, hi = _bias2_interval(theta, *proj, level, COS_FIRST_ORDER_FACTOR, ramp=True)
    return -(hi - point) / 2, (point - lo) / 2


def _bisect(f, a: float, b: float, steps: int = 60) -> float:
    """The root of an increasing f with f(a) <= 0 < f(b), by bisection."""
    for _ in range(steps):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if f(mid) <= 0 else (a, mid)
    return b


def _jackknife_bias(values: np.ndarray, num_x_units: int) -> float:
    """Two-sample jackknife estimate of a statistic's O(1/M + 1/K) bias (Quenouille
    1956): sum over both samples of (a - 1) (mean of the delete-one values - full)."""
    full = values[0]
    bias = 0.0
    for part in (values[1 : 1 + num_x_units], values[1 + num_x_units :]):
        bias += (len(part) - 1) * (part.mean() - full)
    return float(bias)


def _snr_intervals(
    snr2: np.ndarray, num_x_units: int, z: float, level: float
) -> dict[str, float]:
    """snr = sqrt(snr^2) and rel_variance = 1 / snr^2 from one interval on snr^2.

    snr^2 = |mu|^2 / tr S is (nearly) unbiased and may be negative when the mean is
    indistinguishable from 0. Where the normal jackknife interval p +- z se
    reaches 0 (the data cannot exclude mu = 0), that interval is used and
    rel_variance is unbounded above. Otherwise the jackknife on the log scale,
    p exp(-+ t se_log) (se_log: jackknife s.e. of log snr^2 = log |mu|^2 - log tr S,
    t: Student quantile at :func:`_jackknife_df`): it follows the ratio's skew, and
    1 / snr^2's upper half is no longer 1 / (p - z se), which explodes as p -> z se.
    """
    point = float(snr2[0])
    se = _jackknife_se(snr2, num_x_units)
    lo, hi = point - z * se, point + z * se
    if point > 0 and np.all(snr2 > 0):
        logs = np.log(snr2)
        t = student_t.ppf(0.5 + level / 2, _jackknife_df(logs, num_x_units))
        se_log = _jackknife_se(logs, num_x_units)
        lo, hi = point * np.exp(-t * se_log), point * np.exp(t * se_log)

    def inverse(v):
        return 1.0 / v if v > 0 else np.inf

    return {
        "snr": float(np.sqrt(max(point, 0.0))),
        "snr_lo": float(np.sqrt(max(lo, 0.0))),
        "snr_hi": float(np.sqrt(max(hi, 0.0))),
        "rel_variance": inverse(point),
        "rel_variance_lo": inverse(hi),
        "rel_variance_hi": inverse(lo),
    }


def log_slope(
    batch_sizes: np.ndarray, variances: np.ndarray, level: float = 0.95
) -> tuple[float, float, float]:
    """Least-squares slope of log variance against log n with a jackknife interval.

    ``variances`` is [R, S]: row 0 the point estimates at the S batch sizes, rows
    1.. jackknife replicates (deleting one independent unit everywhere at once, so
    the correlation between sizes that share trajectories is kept). An i.i.d.
    estimator has slope -1.
    """
    x = np.log(np.asarray(batch_sizes, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(np.asarray(variances, np.float64))
        y = np.where(np.isfinite(y), y, np.nan)
    xc = x - x.mean()
    slopes = y @ xc / np.sum(xc**2)
    reps = slopes[1:]
    a = len(reps)
    se = float(np.sqrt((a - 1) / a * np.sum((reps - reps.mean()) ** 2)))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return float(slopes[0]), float(slopes[0] - z * se), float(slopes[0] + z * se)
