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
so the distances match the reference's, not just approximately.
"""

import jax
import jax.numpy as jnp
import numpy as np

_TOP, _BOTTOM, _LEFT, _RIGHT = 1, 2, 4, 8
_CLIP_ROUNDS = 2  # two clips reach SDL's answer (tests compare with pygame)


def _tdiv(a: jax.Array, b: jax.Array) -> jax.Array:
    """C integer division (towards zero) of integer-valued floats."""
    return jnp.trunc(a / jnp.where(b == 0, 1.0, b))


def clip_start(x1, y1, x2, y2, left, top, width, height, rounds: int = _CLIP_ROUNDS):
    """SDL2 ``SDL_IntersectRectAndLine``'s first clipped point, batched.

    All arguments are integer-valued float arrays that broadcast together.

    Returns:
        ``(hit, x, y)``: whether the segment meets the box, and the first point of
        the clipped segment (the start point itself when it lies inside).
    """
    right, bottom = left + width - 1, top + height - 1
    miss = (
        ((x1 < left) & (x2 < left))
        | ((x1 > right) & (x2 > right))
        | ((y1 < top) & (y2 < top))
        | ((y1 > bottom) & (y2 > bottom))
    )

    def outcode(x, y):
        return jnp.where(y < top, _TOP, jnp.where(y > bottom, _BOTTOM, 0)) | jnp.where(
            x < left, _LEFT, jnp.where(x > right, _RIGHT, 0)
        )

    code2 = outcode(x2, y2)
    x, y, code = x1, y1, outcode(x1, y1)
    for _ in range(rounds):
        miss = miss | ((code & code2) != 0)
        vertical_edge = (code & (_TOP | _BOTTOM)) != 0
        edge_y = jnp.where((code & _TOP) != 0, top, bottom)
        edge_x = jnp.where((code & _LEFT) != 0, left, right)
        new_x = jnp.where(
            vertical_edge, x + _tdiv((x2 - x) * (edge_y - y), y2 - y), edge_x
        )
        new_y = jnp.where(
            vertical_edge, edge_y, y + _tdiv((y2 - y) * (edge_x - x), x2 - x)
        )
        move = (code != 0) & ~miss
        x, y = jnp.where(move, new_x, x), jnp.where(move, new_y, y)
        code = jnp.where(move, outcode(x, y), code)
    # Horizontal and vertical segments are clamped, not clipped, in SDL.
    horizontal, vertical = y1 == y2, (x1 == x2) & (y1 != y2)
    x = jnp.where(horizontal, jnp.clip(x1, left, right), x)
    y = jnp.where(horizontal, y1, jnp.where(vertical, jnp.clip(y1, top, bottom), y))
    x = jnp.where(vertical, x1, x)
    hit = ~miss & ((code == 0) | horizontal | vertical)
    return hit, x, y


def _reference_cos_sin_table() -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of integer degrees as the reference gets them, in float32.

    The reference computes ray ends in float64 and pygame reads coordinates as C
    floats (float32) before truncating them to ints. For angles whose cos or sin
    is a round number that decides the pixel: float32(cos(90 deg) in float64) is
    6e-17 and keeps x on its pixel, while cos computed in float32 is -4e-8 and
    drops x to the pixel on the left. A float32 table of the float64 values
    reproduces the reference's pixels.
    """
    degrees = np.radians(np.arange(-_TABLE_RANGE, _TABLE_RANGE + 1, dtype=np.float64))
    return np.cos(degrees).astype(np.float32), np.sin(degrees).astype(np.float32)


_TABLE_RANGE = 270
_COS_TABLE, _SIN_TABLE = _reference_cos_sin_table()


def _cos_sin_degrees(angle: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of angles in degrees; integer angles match the reference."""
    rounded = jnp.round(angle)
    exact = (rounded == angle) & (jnp.abs(rounded) <= _TABLE_RANGE)
    index = jnp.clip(rounded, -_TABLE_RANGE, _TABLE_RANGE).astype(jnp.int32)
    index = index + _TABLE_RANGE
    rad = jnp.deg2rad(angle)
    cos = jnp.where(exact, jnp.asarray(_COS_TABLE)[index], jnp.cos(rad))
    sin = jnp.where(exact, jnp.asarray(_SIN_TABLE)[index], jnp.sin(rad))
    return cos, sin


def scan(state, params, num_rays: int = 180) -> jax.Array:
    """Ray lengths in pixels, float32 ``[num_rays]`` (divide by 196 to normalise)."""
    ox = params.bird_x + params.bird_width
    oy = state.bird_y + params.bird_height / 2
    visible_rot = jnp.minimum(state.bird_rot, params.lidar_rot_threshold)
    angle = np.arange(num_rays) * (180.0 / num_rays) - 90.0 - visible_rot
    cos, sin = _cos_sin_degrees(angle)
    end_x = params.lidar_max_distance * cos + ox  # [R]
    end_y = params.lidar_max_distance * sin + oy

    # Boxes as pygame builds them: corners truncated to int.
    # Order: ground, then (upper, lower) of each pipe from left to right.
    px = jnp.trunc(state.pipe_x)
    upper_y = jnp.trunc(state.pipe_gap_top - params.pipe_height)
    lower_y = jnp.trunc(state.pipe_gap_top + params.pipe_gap)
    box_left = jnp.concatenate([jnp.zeros(1), jnp.repeat(px, 2)])  # [7]
    box_top = jnp.concatenate(
        [jnp.trunc(params.ground_y)[None], jnp.stack([upper_y, lower_y], -1).ravel()]
    )
    box_w = jnp.concatenate(
        [jnp.full(1, params.base_width), jnp.full(6, params.pipe_width)]
    )
    box_h = jnp.concatenate(
        [jnp.full(1, params.base_height), jnp.full(6, params.pipe_height)]
    )
    hit, hx, hy = clip_start(
        jnp.trunc(jnp.asarray(ox, jnp.float32)),
        jnp.trunc(oy),
        jnp.trunc(end_x)[:, None],
        jnp.trunc(end_y)[:, None],
        box_left,
        box_top,
        box_w,
        box_h,
    )  # [R, 7]

    pipe_hit = hit[:, 1:]
    first = jnp.argmax(pipe_hit, axis=1) + 1
    any_pipe = jnp.any(pipe_hit, axis=1)
    chosen = jnp.where(any_pipe, first, 0)
    use = any_pipe | hit[:, 0]
    cx = jnp.take_along_axis(hx, chosen[:, None], axis=1)[:, 0]
    cy = jnp.take_along_axis(hy, chosen[:, None], axis=1)[:, 0]
    cx, cy = jnp.where(use, cx, end_x), jnp.where(use, cy, end_y)
    cy = jnp.minimum(cy, params.ground_y)
    return jnp.sqrt((ox - cx) ** 2 + (oy - cy) ** 2).astype(jnp.float32)
