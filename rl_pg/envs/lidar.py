"""The reference's 180-ray LIDAR (flappy_bird_gymnasium/envs/lidar.py, v0.4.0).

Rays start at the bird's front middle ``(x + 34, y + 12)`` and point at angles
``i * 180 / num_rays - 90 - min(rot, 20)`` degrees (y grows downwards), with
length ``lidar_max_distance`` (196). Each ray stops at the first obstacle in the
reference's priority order: a pipe (pipes taken from left to right, the upper
box before the lower one) overrides the ground box; a stopping point below the
ground line is lifted onto it (its x is kept, as in the reference, which is why
a few distances exceed the ray length).

The reference clips each ray with ``pygame.Rect.clipline``, i.e. SDL2's
``SDL_IntersectRectAndLine``: endpoints truncated to integers, then
Cohen-Sutherland on the integer grid with C integer division. That is emulated
here exactly (in float32 holding integers, which is exact at these magnitudes),
and the ray endpoints are rounded as the reference's float64 ones are, so the
distances are the reference's, not just close to them.

Speed. A scan is 180 rays x 7 boxes of integer clipping, most of the LIDAR
env's step, so it is written for XLA on CPU to make one fused loop over the
rays of a batch, with nothing materialised per (ray, box):

* everything that depends only on the origin and a box (its outcode, which edge
  is clipped first) is per-env scalar work;
* the first clip's divisor is the ray's dx or dy, so its reciprocal is computed
  once per ray and the division becomes an exact multiplication
  (:func:`_tdiv_by_reciprocal`);
* the second clip's division feeds a single floor (a truncation would use it
  three times, which makes XLA keep it as an array rather than recompute it);
* the boxes fold into one running squared distance, so the loop has a single
  output and nothing is computed twice.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _tdiv_by_reciprocal(t: jax.Array, reciprocal: jax.Array) -> jax.Array:
    """C integer division ``t / d`` of integer-valued floats, given ``1 / d``.

    ``(t +- 1/2) / d`` (away from zero) is at least ``1 / (2 |d|)`` away from the
    integers at which truncation changes, and multiplying by the correctly
    rounded reciprocal is off by less than that while ``|t| < 2**21``, so the
    truncation is exact: far beyond the coordinates of a 288 x 512 screen.
    """
    return jnp.trunc((t + jnp.copysign(0.5, t)) * reciprocal)


def _safe_reciprocal(d: jax.Array) -> jax.Array:
    """``1 / d``, with 1 for ``d == 0`` (where the result is never used)."""
    return 1.0 / jnp.where(d == 0, 1.0, d)


def _clip(x1, y1, x2, y2, left, top, width, height, inv_dx, inv_dy):
    """:func:`clip_start`, with the point in the frame of the first clipped edge.

    Returns:
        ``(hit, inside, horizontal_edge, u, v)``: the first point is the start
        point where ``inside``, else ``(u, v)`` if ``horizontal_edge`` (the first
        clip was on the top or bottom edge) and ``(v, u)`` otherwise.
    """
    right, bottom = left + width - 1, top + height - 1

    # Outcode of the start point (scalar work in a scan).
    above, below = y1 < top, y1 > bottom
    before, beyond = x1 < left, x1 > right
    inside = ~(above | below | before | beyond)
    # SDL's trivial reject: both points beyond the same edge.
    inf = jnp.float32(jnp.inf)
    miss = (
        (x2 < jnp.where(before, left, -inf))
        | (x2 > jnp.where(beyond, right, inf))
        | (y2 < jnp.where(above, top, -inf))
        | (y2 > jnp.where(below, bottom, inf))
    )

    # First clip, in the edge's frame: v is the clipped coordinate (y for a top
    # or bottom edge, x otherwise) and u the one that is solved for.
    horizontal_edge = above | below
    edge = jnp.where(
        horizontal_edge, jnp.where(above, top, bottom), jnp.where(before, left, right)
    )
    u1, v1 = jnp.where(horizontal_edge, x1, y1), jnp.where(horizontal_edge, y1, x1)
    u_lo = jnp.where(horizontal_edge, left, top)
    u_hi = jnp.where(horizontal_edge, right, bottom)
    v_lo = jnp.where(horizontal_edge, top, left)
    v_hi = jnp.where(horizontal_edge, bottom, right)
    u2, v2 = jnp.where(horizontal_edge, x2, y2), jnp.where(horizontal_edge, y2, x2)
    du = jnp.where(horizontal_edge, x2 - x1, y2 - y1)
    inv_dv = jnp.where(horizontal_edge, inv_dy, inv_dx)
    u = u1 + _tdiv_by_reciprocal(du * (edge - v1), inv_dv)

    # Second clip, when the first point landed beyond the u range. Where it did
    # and the segment is not rejected, edge2 lies between u and u2, so the ratio
    # below is positive and truncation is a floor of |v2 - edge| times it.
    short, long = u < u_lo, u > u_hi
    miss = miss | (short & (u2 < u_lo)) | (long & (u2 > u_hi))
    edge2 = jnp.where(short, u_lo, u_hi)
    step = jnp.floor(jnp.abs(v2 - edge) * (edge2 - u) / (u2 - u))
    v = edge + jnp.copysign(step, v2 - edge)
    second = short | long
    hit = inside | (~miss & (~second | ((v >= v_lo) & (v <= v_hi))))
    u_hit, v_hit = jnp.where(second, edge2, u), jnp.where(second, v, edge)
    return hit, inside, horizontal_edge, u_hit, v_hit


def clip_start(
    x1, y1, x2, y2, left, top, width, height, inv_dx=None, inv_dy=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SDL2 ``SDL_IntersectRectAndLine``'s first clipped point, batched.

    All arguments are integer-valued float arrays that broadcast together. In a
    LIDAR scan the start point and the box are per-env scalars and only the end
    point varies per ray, so most of the work is scalar.

    SDL clips the start point at most twice before it lands in the box or the
    segment is rejected (the tests compare with pygame): first on the edge its
    outcode names first (top or bottom before left or right), then, if it landed
    beyond the other axis' range, on that range's edge. Segments parallel to an
    axis are clamped rather than clipped in SDL; the same formulas give the same
    point for them.

    Args:
        inv_dx, inv_dy: optional ``1 / (x2 - x1)`` and ``1 / (y2 - y1)`` (with 1
            for a zero difference), to share between boxes.

    Returns:
        ``(hit, x, y)``: whether the segment meets the box, and the first point of
        the clipped segment (the start point itself when it lies inside).
    """
    inv_dx = _safe_reciprocal(x2 - x1) if inv_dx is None else inv_dx
    inv_dy = _safe_reciprocal(y2 - y1) if inv_dy is None else inv_dy
    hit, inside, horizontal_edge, u, v = _clip(
        x1, y1, x2, y2, left, top, width, height, inv_dx, inv_dy
    )
    x = jnp.where(inside, x1, jnp.where(horizontal_edge, u, v))
    y = jnp.where(inside, y1, jnp.where(horizontal_edge, v, u))
    return hit, x, y


_TABLE_RANGE = 270  # degrees


def _reference_cos_sin_table() -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of integer degrees, as float32 that round like the reference.

    The reference computes ray ends in float64 and pygame truncates them to ints,
    so what matters is on which side of an integer ``d * cos + x`` falls. For
    most angles the float32 of the float64 value decides it the same way. Where
    float32 rounds the value onto a round number (sin 30 deg: 0.49999999999999994
    in float64, 0.5 in float32), ``196 * sin + y`` lands exactly on an integer in
    float32 but just below it in float64, a pixel apart after truncation; those
    entries are moved one float32 step towards the float64 value, which puts the
    float32 sums on the same side as the reference's.
    """
    degrees = np.radians(np.arange(-_TABLE_RANGE, _TABLE_RANGE + 1, dtype=np.float64))
    tables = []
    for exact in (np.cos(degrees), np.sin(degrees)):
        rounded = exact.astype(np.float32)
        onto_round = (rounded != exact) & (rounded * 2 == np.round(rounded * 2))
        towards = np.where(exact > rounded, np.float32(np.inf), np.float32(-np.inf))
        tables.append(np.where(onto_round, np.nextafter(rounded, towards), rounded))
    return tables[0].astype(np.float32), tables[1].astype(np.float32)


_COS_TABLE, _SIN_TABLE = _reference_cos_sin_table()


def ray_cos_sin(visible_rot: jax.Array, num_rays: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the ``num_rays`` ray angles, float32 ``[num_rays]`` each.

    When the angles are integer degrees (180 / num_rays an integer and an
    integer rotation: always, under default parameters) they are a contiguous
    slice of the reference-rounding tables. Otherwise they come from the angle
    addition formula, clipped to [-1, 1].
    """
    step = 180 / num_rays
    offsets = np.radians(np.arange(num_rays) * step)
    first = -90.0 - visible_rot  # angle of ray 0, degrees
    c0, s0 = jnp.cos(jnp.deg2rad(first)), jnp.sin(jnp.deg2rad(first))
    c, s = np.cos(offsets).astype(np.float32), np.sin(offsets).astype(np.float32)
    cos = jnp.clip(c * c0 - s * s0, -1.0, 1.0)
    sin = jnp.clip(s * c0 + c * s0, -1.0, 1.0)
    if 180 % num_rays == 0:
        stride = 180 // num_rays
        span = (num_rays - 1) * stride + 1
        start = jnp.round(first)
        in_table = (
            (start == first)
            & (start >= -_TABLE_RANGE)
            & (start + span - 1 <= _TABLE_RANGE)
        )
        index = jnp.clip(start + _TABLE_RANGE, 0, 2 * _TABLE_RANGE + 1 - span)
        index = index.astype(jnp.int32)
        table_cos = jax.lax.dynamic_slice(jnp.asarray(_COS_TABLE), (index,), (span,))
        table_sin = jax.lax.dynamic_slice(jnp.asarray(_SIN_TABLE), (index,), (span,))
        cos = jnp.where(in_table, table_cos[::stride], cos)
        sin = jnp.where(in_table, table_sin[::stride], sin)
    return cos, sin


def scan(state, params, num_rays: int = 180) -> jax.Array:
    """Ray lengths in pixels, float32 ``[num_rays]`` (divide by 196 to normalise)."""
    ox = params.bird_x + params.bird_width
    oy = state.bird_y + params.bird_height / 2
    cos, sin = ray_cos_sin(
        jnp.minimum(state.bird_rot, params.lidar_rot_threshold), num_rays
    )
    end_x = params.lidar_max_distance * cos + ox  # [R]
    end_y = params.lidar_max_distance * sin + oy
    x1, y1 = jnp.trunc(jnp.asarray(ox, jnp.float32)), jnp.trunc(oy)
    x2, y2 = jnp.trunc(end_x), jnp.trunc(end_y)
    inv_dx, inv_dy = _safe_reciprocal(x2 - x1), _safe_reciprocal(y2 - y1)
    ground_y, inf = params.ground_y, jnp.float32(jnp.inf)

    def squared_distance(x, y):
        """From the origin, to a point lifted onto the ground line if below it."""
        return (ox - x) ** 2 + (oy - jnp.minimum(y, ground_y)) ** 2

    def clip(left, top, width, height):
        """(hit, squared distance to the first point), per ray."""
        hit, inside, horizontal_edge, u, v = _clip(
            x1, y1, x2, y2, left, top, width, height, inv_dx, inv_dy
        )
        # squared_distance(x, y) in the edge's frame: per-env scalars decide
        # which of u and v is x, so no per-ray selects are needed.
        ou, ov = jnp.where(horizontal_edge, ox, oy), jnp.where(horizontal_edge, oy, ox)
        cap_u = jnp.where(horizontal_edge, inf, ground_y)
        cap_v = jnp.where(horizontal_edge, ground_y, inf)
        u, v = jnp.where(u < cap_u, u, cap_u), jnp.where(v < cap_v, v, cap_v)
        d2 = (ou - u) ** 2 + (ov - v) ** 2
        return hit, jnp.where(inside, squared_distance(x1, y1), d2)

    # Boxes as pygame builds them: corners truncated to int. Later boxes
    # override earlier ones: ground, then pipes from right to left, the lower
    # box before the upper one.
    hit, d2_hit = clip(0.0, jnp.trunc(ground_y), params.base_width, params.base_height)
    d2 = jnp.where(hit, d2_hit, squared_distance(end_x, end_y))
    pipe_left = jnp.trunc(state.pipe_x)
    upper_top = jnp.trunc(state.pipe_gap_top - params.pipe_height)
    lower_top = jnp.trunc(state.pipe_gap_top + params.pipe_gap)
    for p in reversed(range(pipe_left.shape[0])):
        for top in (lower_top[p], upper_top[p]):
            hit, d2_hit = clip(pipe_left[p], top, params.pipe_width, params.pipe_height)
            d2 = jnp.where(hit, d2_hit, d2)
    return jnp.sqrt(d2).astype(jnp.float32)


def pipes_in_reach(pipe_x: jax.Array, params) -> jax.Array:
    """Whether any ray can reach a pipe at ``pipe_x``, from any bird height.

    False when every pipe's (truncated) left edge lies right of the rays' reach
    ``bird_x + bird_width + |lidar_max_distance|``: both ends of every ray are
    then left of the box, which is a trivial reject in the clip, so the scan does
    not depend on the pipes' gaps. True otherwise (conservatively).
    """
    reach = jnp.trunc(
        params.bird_x + params.bird_width + jnp.abs(params.lidar_max_distance)
    )
    return ~(jnp.min(jnp.trunc(pipe_x)) > reach)
