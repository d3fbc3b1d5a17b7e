"""A jittable renderer: environment state -> image, at any resolution.

Each pixel samples the world (288 x 512 px, y down) at its centre and gets a class
(sky, pipe, pipe rim, ground, ground stripe, bird, eye, beak, score digit); a
palette turns classes into RGB for viewing or into high-contrast gray levels for
the pixel observation. Everything is built from per-row and per-column vectors
combined by broadcasting, so a frame costs a few operations per pixel and the
same code draws 512 x 288 GIF frames and 84 x 84 observations. ``vmap`` it over
a batch of states.
"""

import jax
import jax.numpy as jnp
import numpy as np

SKY, PIPE, RIM, GROUND, STRIPE, BIRD, EYE, BEAK, DIGIT = range(9)

RGB_PALETTE = np.array(
    [
        (78, 192, 202),  # sky
        (116, 191, 46),  # pipe
        (84, 128, 32),  # pipe rim
        (222, 216, 149),  # ground
        (156, 226, 89),  # grass stripe
        (250, 200, 40),  # bird
        (20, 20, 20),  # eye
        (240, 96, 40),  # beak
        (255, 255, 255),  # digits
    ],
    dtype=np.uint8,
)
# Gray levels for the observation, chosen for contrast rather than luminance
# (the sky and the pipes have nearly equal luminance in colour).
GRAY_PALETTE = np.array([30, 170, 120, 90, 70, 255, 0, 210, 60], dtype=np.uint8)

# Seven-segment digits: segments a (top), b, c, d (bottom), e, f, g (middle).
_SEGMENTS = np.array(
    [
        [1, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 1],
        [1, 1, 1, 1, 0, 0, 1],
        [0, 1, 1, 0, 0, 1, 1],
        [1, 0, 1, 1, 0, 1, 1],
        [1, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 1, 1],
    ],
    dtype=bool,
)
_MAX_DIGITS = 6
_DIGIT_W, _DIGIT_H, _DIGIT_PITCH, _SEG = 22.0, 36.0, 28.0, 5.0


def _digit_layer(wx, wy, score, screen_width, screen_height):
    """Mask [H, W] of the score drawn in seven-segment digits, top centre."""
    score = jnp.clip(score, 0, 10**_MAX_DIGITS - 1)
    powers = 10 ** jnp.arange(_MAX_DIGITS - 1, -1, -1)
    num_digits = 1 + jnp.sum(score >= 10 ** jnp.arange(1, _MAX_DIGITS))
    left = (screen_width - num_digits * _DIGIT_PITCH) / 2
    top = 0.1 * screen_height
    rel_x = wx - left  # [W]
    cell = jnp.floor(rel_x / _DIGIT_PITCH).astype(jnp.int32)
    in_cells = (cell >= 0) & (cell < num_digits)
    lx = rel_x - cell * _DIGIT_PITCH
    ly = wy - top  # [H]
    place = jnp.clip(_MAX_DIGITS - num_digits + cell, 0, _MAX_DIGITS - 1)
    digit = (score // powers[place]) % 10  # [W]
    on = jnp.asarray(_SEGMENTS)[digit]  # [W, 7]
    mid = _DIGIT_H / 2
    col_left, col_right = lx < _SEG, (lx >= _DIGIT_W - _SEG) & (lx < _DIGIT_W)
    col_any = (lx >= 0) & (lx < _DIGIT_W) & in_cells
    row_top, row_bottom = ly < _SEG, (ly >= _DIGIT_H - _SEG) & (ly < _DIGIT_H)
    row_mid = jnp.abs(ly - mid) < _SEG / 2
    upper = (ly >= 0) & (ly < mid)
    lower = (ly >= mid) & (ly < _DIGIT_H)
    r, c = (lambda v: v[:, None]), (lambda v: v[None, :])
    segments = (
        c(on[:, 0]) & r(row_top) & r(ly >= 0),
        c(on[:, 1] & col_right) & r(upper),
        c(on[:, 2] & col_right) & r(lower),
        c(on[:, 3]) & r(row_bottom),
        c(on[:, 4] & col_left) & r(lower),
        c(on[:, 5] & col_left) & r(upper),
        c(on[:, 6]) & r(row_mid),
    )
    mask = segments[0]
    for s in segments[1:]:
        mask = mask | s
    return mask & c(col_any)


def render_classes(
    state, params, shape: tuple[int, int], show_score: bool = False
) -> jax.Array:
    """Class map uint8 ``[H, W]`` of one state (see the module's class list)."""
    height, width = shape
    sw, sh = params.screen_width, params.screen_height
    wx = (jnp.arange(width, dtype=jnp.float32) + 0.5) * (sw / width)  # [W]
    wy = (jnp.arange(height, dtype=jnp.float32) + 0.5) * (sh / height)  # [H]
    r, c = (lambda v: v[:, None]), (lambda v: v[None, :])

    # Pipes: a column range each, solid above the gap top and below its bottom.
    x0 = state.pipe_x[:, None]  # [3, 1]
    in_col = (wx >= x0) & (wx < x0 + params.pipe_width)  # [3, W]
    rim_col = in_col & ((wx < x0 + 3.0) | (wx >= x0 + params.pipe_width - 3.0))
    top = state.pipe_gap_top[:, None]
    bottom = top + params.pipe_gap
    solid_row = (wy < top) | (wy >= bottom)  # [3, H]
    lip_row = solid_row & ((wy >= top - 12.0) & (wy < bottom + 12.0))
    pipe = jnp.zeros((height, width), bool)
    rim = jnp.zeros((height, width), bool)
    for p in range(state.pipe_x.shape[0]):
        body = r(solid_row[p]) & c(in_col[p])
        pipe = pipe | body
        rim = rim | (body & (c(rim_col[p]) | r(lip_row[p])))

    # Ground with diagonal stripes that scroll with the pipes.
    ground = wy >= params.ground_y
    offset = (params.pipe_speed * state.time) % 24.0  # one scalar fmod per frame
    phase = c(wx) + r(wy) + offset
    phase = phase - 24.0 * jnp.floor(phase / 24.0)  # elementwise fmod is slow on CPU
    stripe = r(ground & (wy < params.ground_y + 10.0)) & (phase < 12.0)

    # Bird: an ellipse rotated by min(rot, 20) degrees, with an eye and a beak.
    theta = jnp.deg2rad(jnp.minimum(state.bird_rot, params.lidar_rot_threshold))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    dx = c(wx - (params.bird_x + params.bird_width / 2))
    dy = r(wy - (state.bird_y + params.bird_height / 2))
    u = dx * cos - dy * sin  # along the body, forward
    v = dx * sin + dy * cos  # across the body, down
    a, b = params.bird_width / 2, params.bird_height / 2
    body = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    eye = (u - 0.45 * a) ** 2 + (v + 0.3 * b) ** 2 <= (0.22 * b) ** 2
    beak = ((u - 0.9 * a) / (0.35 * a)) ** 2 + ((v - 0.15 * b) / (0.3 * b)) ** 2 <= 1

    classes = jnp.full((height, width), SKY, jnp.uint8)
    classes = jnp.where(pipe, PIPE, classes)
    classes = jnp.where(rim, RIM, classes)
    classes = jnp.where(r(ground), GROUND, classes)
    classes = jnp.where(stripe, STRIPE, classes)
    if show_score:
        digits = _digit_layer(wx, wy, state.score, sw, sh)
        classes = jnp.where(digits, DIGIT, classes)
    classes = jnp.where(body, BIRD, classes)
    classes = jnp.where(beak, BEAK, classes)
    classes = jnp.where(eye & body, EYE, classes)
    return classes.astype(jnp.uint8)


def _lookup(palette: np.ndarray, classes: jax.Array) -> jax.Array:
    """palette[classes] as a chain of selects (a gather per pixel is slow on CPU)."""
    out = jnp.broadcast_to(
        jnp.asarray(palette[0]), (*classes.shape, *palette.shape[1:])
    )
    for k in range(1, len(palette)):
        hit = (classes == k).reshape(*classes.shape, *([1] * (palette.ndim - 1)))
        out = jnp.where(hit, jnp.asarray(palette[k]), out)
    return out


def render_gray(state, params, shape: tuple[int, int] = (84, 84)) -> jax.Array:
    """Grayscale uint8 ``[H, W]`` observation frame (no score, like the reference)."""
    return _lookup(GRAY_PALETTE, render_classes(state, params, shape))


def render_rgb(
    state, params, shape: tuple[int, int] = (512, 288), show_score: bool = True
) -> jax.Array:
    """RGB uint8 ``[H, W, 3]`` frame for viewing (default: full 288 x 512 screen)."""
    return _lookup(RGB_PALETTE, render_classes(state, params, shape, show_score))


def write_gif(frames, path, fps: int = 30) -> None:
    """Write ``frames`` (uint8 ``[N, H, W, 3]``) to an animated GIF at ``path``."""
    import imageio.v3 as iio  # only needed here; keeps import rl_pg light

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.shape}")
    iio.imwrite(path, frames, duration=1000 / fps, loop=0)


def episode_frames(env, params, key, act_fn, num_steps: int, shape=(512, 288)):
    """RGB frames of one episode (the first ``num_steps`` steps at most).

    Args:
        act_fn: ``(obs, state, key) -> action`` for one unbatched env.

    Returns:
        uint8 numpy array ``[N, H, W, 3]``: the reset frame, then one frame per
        step up to and including the crash.
    """

    @jax.jit
    def run(key):
        key_reset, key_run = jax.random.split(key)
        obs, state = env.reset_env(key_reset, params)

        def body(carry, key):
            obs, state, alive = carry
            key_act, key_step = jax.random.split(key)
            action = act_fn(obs, state, key_act)
            obs, state, _, terminated, _ = env.step_env(key_step, state, action, params)
            frame = render_rgb(state, params, shape)
            return (obs, state, alive & ~terminated), (frame, alive)

        first = render_rgb(state, params, shape)
        keys = jax.random.split(key_run, num_steps)
        _, (frames, alive) = jax.lax.scan(body, (obs, state, jnp.bool_(True)), keys)
        return first, frames, alive

    first, frames, alive = run(key)
    count = int(np.sum(np.asarray(alive)))
    return np.concatenate([np.asarray(first)[None], np.asarray(frames)[:count]])
