"""A scripted Flappy Bird controller: a baseline policy that needs no training."""

import jax
import jax.numpy as jnp


def scripted_action(state, params, margin: float = 14.0) -> jax.Array:
    """Flap when falling and the bird's bottom nears the next gap's bottom edge.

    The next pipe is the leftmost one whose right edge is still ahead of the
    bird. Works on one unbatched state; ``vmap`` it for a batch.
    """
    ahead = state.pipe_x + params.pipe_width > params.bird_x - 4.0
    next_pipe = jnp.argmax(ahead)
    gap_bottom = state.pipe_gap_top[next_pipe] + params.pipe_gap
    falling = state.bird_vel >= 0
    low = state.bird_y + params.bird_height > gap_bottom - margin
    return (falling & low).astype(jnp.int32)
