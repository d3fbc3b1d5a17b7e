"""A jittable renderer: environment state -> image, at any resolution.

Each pixel samples the world (288 x 512 px, y down) at its centre and shows the
topmost of the layers sky, pipe, pipe rim, ground, ground stripe, score digit,
bird, beak and eye; a palette gives each layer an RGB colour for viewing or a
high-contrast gray level for the pixel observation. ``vmap`` it over a batch of
states; the same code draws 512 x 288 GIF frames and 84 x 84 observations.

The pixel observation renders a frame every env step, so the work is arranged
for XLA on CPU: every layer is worked out per row and per column (about a
hundred operations each) and a pixel only combines them (about twenty):

* pipes, rims and the ground: the AND of a per-row and a per-column bit word
  (one bit per pipe and role) is nonzero where they cover the pixel;
* the bird's body, beak and eye, convex ellipses: a column range per row;
* the diagonal ground stripes: a per-row plus a per-column phase.

The row and column quantities end in reductions or square roots, which XLA
computes once into small arrays rather than again for every pixel.
"""

import functools

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


def _pixel_centres(params, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """World x of each column's centre ``[W]`` and world y of each row's ``[H]``."""
    height, width = shape
    wx = (jnp.arange(width, dtype=jnp.float32) + 0.5) * (params.screen_width / width)
    wy = (jnp.arange(height, dtype=jnp.float32) + 0.5) * (params.screen_height / height)
    return wx, wy


def pipes_in_view(pipe_x: jax.Array, params, shape: tuple[int, int]) -> jax.Array:
    """Whether a pipe at ``pipe_x`` covers a pixel centre of a ``shape`` frame.

    The pipe layers take their columns from this very test, so where it is False
    a frame does not depend on the pipes' gaps.
    """
    wx, _ = _pixel_centres(params, shape)
    x0 = pipe_x[:, None]
    return jnp.any((wx >= x0) & (wx < x0 + params.pipe_width))


_COLUMN_SHIFT = 16  # the column word holds its column's index from this bit up


def _bit_word(masks: jax.Array, high=0) -> jax.Array:
    """int32 ``[N]``: bit ``i`` is ``masks[i]`` (bool ``[K, N]``), plus ``high``.

    A sum over ``K``: as a reduction it makes XLA compute the word once per row
    (column) rather than again for every pixel.
    """
    weights = (1 << np.arange(masks.shape[0], dtype=np.int32))[:, None]
    terms = jnp.concatenate(
        [jnp.where(masks, weights, 0), jnp.broadcast_to(high, masks.shape[1:])[None]]
    )
    return jnp.sum(terms, axis=0, dtype=jnp.int32)


def _row_and_column_words(state, params, wx, wy):
    """Row and column bit words for pipes, rims, the ground (and the bird).

    With ``n`` pipes, bit ``p`` of ``row & col`` is set where pipe ``p``'s body
    covers the pixel, bits ``n + p`` and ``2n + p`` where its rim does (the rim
    columns of a solid row, the whole width of a lip row), and bit ``3n`` on the
    ground. The column word also holds the column's index from bit
    ``_COLUMN_SHIFT`` up, so column ranges (the bird's) are tested on it
    directly.
    """
    x0 = state.pipe_x[:, None]
    in_col = (wx >= x0) & (wx < x0 + params.pipe_width)  # [n, W]
    rim_col = in_col & ((wx < x0 + 3.0) | (wx >= x0 + params.pipe_width - 3.0))
    top = state.pipe_gap_top[:, None]
    bottom = top + params.pipe_gap
    solid_row = (wy < top) | (wy >= bottom)  # [n, H]
    lip_row = solid_row & ((wy >= top - 12.0) & (wy < bottom + 12.0))
    ground_row = wy >= params.ground_y
    every_col = jnp.ones((1, wx.shape[0]), bool)
    row = _bit_word(jnp.concatenate([solid_row, solid_row, lip_row, ground_row[None]]))
    index = jnp.arange(wx.shape[0], dtype=jnp.int32) << _COLUMN_SHIFT
    col = _bit_word(jnp.concatenate([in_col, rim_col, in_col, every_col]), index)
    return row, col


def _ellipse_columns(wy, cos, sin, centre, u0, v0, semi_u, semi_v, shape, params):
    """First and last column inside an ellipse, per row (int32 ``[H]`` each).

    The ellipse is given in the bird's frame, ``u = dx cos - dy sin`` forward and
    ``v = dx sin + dy cos`` down from the bird's centre ``centre``: its own centre
    ``(u0, v0)`` and semi-axes ``semi_u``, ``semi_v``. On each row the inside is
    one interval of ``dx``, between the roots of a quadratic; in column units
    (column ``j`` is centred on ``(j + 0.5) * column_width``) it is
    ``|j - mid| <= half``. Rows that miss the ellipse get ``first > last``.

    ``half`` ends in a square root, which XLA computes once per row rather than
    per pixel; the rest is a few scalar operations per row.
    """
    width = shape[1]
    column_width = params.screen_width / width
    centre_x, centre_y = centre
    pu, pv = 1.0 / semi_u**2, 1.0 / semi_v**2
    dy = wy - centre_y
    ku = dy * sin + u0  # u - u0 = dx cos - ku
    kv = dy * cos - v0  # v - v0 = dx sin + kv
    # inside: a dx^2 + 2 b dx + c <= 0
    a = cos**2 * pu + sin**2 * pv
    b = kv * sin * pv - ku * cos * pu
    c = ku**2 * pu + kv**2 * pv - 1.0
    half = jnp.sqrt((b * b - a * c) / (a * column_width) ** 2)  # NaN: no roots
    # b is linear in dy (chord midpoints of an ellipse lie on a line)
    slope = sin * cos * (pv - pu)
    b0 = -(v0 * sin * pv + u0 * cos * pu)
    mid_at_centre = (centre_x - b0 / a) / column_width - 0.5
    mid = mid_at_centre - slope / (a * column_width) * dy
    hit = half >= 0  # False for NaN
    first = jnp.clip(jnp.ceil(mid - half), 0, width)
    last = jnp.clip(jnp.floor(mid + half), -1, width - 1)
    first = jnp.where(hit, first, 1.0).astype(jnp.int32)
    last = jnp.where(hit, last, 0.0).astype(jnp.int32)
    return first, last


def _bird_columns(state, params, shape, wy):
    """``(first, last)`` column per row of the bird's body, beak and eye."""
    theta = jnp.deg2rad(jnp.minimum(state.bird_rot, params.lidar_rot_threshold))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    centre = (
        params.bird_x + params.bird_width / 2,
        state.bird_y + params.bird_height / 2,
    )
    a, b = params.bird_width / 2, params.bird_height / 2

    def ellipse(u0, v0, semi_u, semi_v):
        return _ellipse_columns(
            wy, cos, sin, centre, u0, v0, semi_u, semi_v, shape, params
        )

    body = ellipse(0.0, 0.0, a, b)
    beak = ellipse(0.9 * a, 0.15 * b, 0.35 * a, 0.3 * b)
    eye = ellipse(0.45 * a, -0.3 * b, 0.22 * b, 0.22 * b)
    return body, beak, eye


def _layers(state, params, shape, show_score: bool) -> list[tuple[jax.Array, int]]:
    """``(mask [H, W], class)`` for each layer above the sky, bottom first."""
    wx, wy = _pixel_centres(params, shape)
    r, c = (lambda v: v[:, None]), (lambda v: v[None, :])
    n = state.pipe_x.shape[0]

    row, col = _row_and_column_words(state, params, wx, wy)
    covered = r(row) & c(col)
    pipe = (covered & ((1 << n) - 1)) != 0
    rim = (covered & (((1 << 2 * n) - 1) << n)) != 0
    ground = (covered & (1 << 3 * n)) != 0

    # Diagonal stripes that scroll with the pipes: (x + y + offset) mod 24 < 12,
    # from a per-column and a per-row phase in [0, 24).
    offset = (params.pipe_speed * state.time) % 24.0  # one scalar fmod per frame
    col_phase = wx + offset
    col_phase = col_phase - 24.0 * jnp.floor(col_phase / 24.0)
    row_phase = wy - 24.0 * jnp.floor(wy / 24.0)
    phase = c(col_phase) + r(row_phase)  # [0, 48)
    band = (wy >= params.ground_y) & (wy < params.ground_y + 10.0)
    stripe = r(band) & ((phase < 12.0) | ((phase >= 24.0) & (phase < 36.0)))

    body, beak, eye = (
        (c(col) >= r(first << _COLUMN_SHIFT))
        & (c(col) < r((last + 1) << _COLUMN_SHIFT))
        for first, last in _bird_columns(state, params, shape, wy)
    )
    eye = eye & body
    layers = [(pipe, PIPE), (rim, RIM), (ground, GROUND), (stripe, STRIPE)]
    if show_score:
        digits = _digit_layer(
            wx, wy, state.score, params.screen_width, params.screen_height
        )
        layers.append((digits, DIGIT))
    return layers + [(body, BIRD), (beak, BEAK), (eye, EYE)]


def _paint(palette: np.ndarray, layers) -> jax.Array:
    """The palette colour of the topmost layer at each pixel."""
    shape = (*layers[0][0].shape, *palette.shape[1:])
    out = jnp.broadcast_to(jnp.asarray(palette[SKY]), shape)
    for mask, cls in layers:
        mask = mask.reshape(*mask.shape, *([1] * (palette.ndim - 1)))
        out = jnp.where(mask, jnp.asarray(palette[cls]), out)
    return out


def render_classes(
    state, params, shape: tuple[int, int], show_score: bool = False
) -> jax.Array:
    """Class map uint8 ``[H, W]`` of one state (see the module's class list)."""
    palette = np.arange(len(RGB_PALETTE), dtype=np.uint8)
    return _paint(palette, _layers(state, params, shape, show_score))


def render_gray(state, params, shape: tuple[int, int] = (84, 84)) -> jax.Array:
    """Grayscale uint8 ``[H, W]`` observation frame (no score, like the reference)."""
    return _paint(GRAY_PALETTE, _layers(state, params, shape, show_score=False))


def render_rgb(
    state, params, shape: tuple[int, int] = (512, 288), show_score: bool = True
) -> jax.Array:
    """RGB uint8 ``[H, W, 3]`` frame for viewing (default: full 288 x 512 screen)."""
    return _paint(RGB_PALETTE, _layers(state, params, shape, show_score))


def write_gif(frames, path, fps: int = 30, *, exclusive: bool = False) -> None:
    """Write ``frames`` (uint8 ``[N, H, W, 3]``) to an animated GIF at ``path``.

    Atomically (a temporary file, then a rename); ``exclusive``: never replace
    an existing file (``FileExistsError``).
    """
    import imageio.v3 as iio  # only needed here; keeps import rl_pg light

    from rl_pg import io

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.shape}")
    with io.atomic_path(path, exclusive=exclusive) as tmp:
        iio.imwrite(tmp, frames, duration=1000 / fps, loop=0)


@functools.cache
def _ignoring_agent_params(act_fn):
    """``(agent_params, obs, state, key) -> act_fn(obs, state, key)``; one object
    per ``act_fn`` (a static jit argument)."""

    def act(agent_params, obs, state, key):
        del agent_params
        return act_fn(obs, state, key)

    return act


@functools.partial(jax.jit, static_argnames=("env", "act_fn", "num_steps", "shape"))
def _episode(env, params, key, act_fn, agent_params, num_steps: int, shape):
    """The reset frame, one frame per step and the alive flags of one episode."""
    key_reset, key_run = jax.random.split(key)
    obs, state = env.reset_env(key_reset, params)

    def body(carry, key):
        obs, state, alive = carry
        key_act, key_step = jax.random.split(key)
        action = act_fn(agent_params, obs, state, key_act)
        obs, state, _, terminated, _ = env.step_env(key_step, state, action, params)
        frame = render_rgb(state, params, shape)
        return (obs, state, alive & ~terminated), (frame, alive)

    first = render_rgb(state, params, shape)
    keys = jax.random.split(key_run, num_steps)
    _, (frames, alive) = jax.lax.scan(body, (obs, state, jnp.bool_(True)), keys)
    return first, frames, alive


def episode_frames(
    env, params, key, act_fn, num_steps: int, shape=(512, 288), *, agent_params=None
):
    """RGB frames of one episode (the first ``num_steps`` steps at most).

    Jitted with ``env``, ``act_fn``, ``num_steps`` and ``shape`` static: calls
    with the same ``act_fn`` object and other ``params``, ``key`` or
    ``agent_params`` (same shapes) reuse one compilation.

    Args:
        act_fn: ``(obs, state, key) -> action`` for one unbatched env; with
            ``agent_params`` given, ``(agent_params, obs, state, key) -> action``
            (an :func:`rl_pg.evaluate.evaluate` act_fn).
        agent_params: what ``act_fn`` reads (network params, a Q-table), traced.

    Returns:
        uint8 numpy array ``[N, H, W, 3]``: the reset frame, then one frame per
        step up to and including the crash.
    """
    if agent_params is None:
        act_fn = _ignoring_agent_params(act_fn)
    first, frames, alive = _episode(
        env, params, key, act_fn, agent_params, num_steps, tuple(shape)
    )
    count = int(np.sum(np.asarray(alive)))
    return np.concatenate([np.asarray(first)[None], np.asarray(frames)[:count]])
