"""Per-trajectory weighted score gradients of a dense policy, layer by layer.

The study's gradient phase needs, per trajectory (column) c and weighting f,

    g[c, f] = sum_t w[t, c, f] grad_theta log pi(a_t | s_t).

When the logits are a chain of dense layers z_l = x_l K_l + b_l, x_{l+1} = phi_l(z_l)
with elementwise phi_l (an MLP; a linear or tabular policy), one backward pass gives
every step's delta_l[t] = d log pi(a_t|s_t) / d z_l[t], and then per layer

    dK_l[c, f] = sum_t w[t, c, f] x_l[c, t] delta_l[c, t]^T,
    db_l[c, f] = sum_t w[t, c, f] delta_l[c, t],

a single batched matmul (columns as the batch, steps contracted) of the weighted
inputs [1; x_l] against the deltas. This is what ``vmap`` of a VJP per column
(:func:`rl_pg.variance.study.weighted_column_grads`) computes, with the backward pass
run once for all weightings instead of once per weighting, activations laid out
[column, feature, step] so that XLA's CPU matmuls need no transposes, and every
block's gradients written straight into their place in the flat outputs.

Which policies qualify is read off the jaxpr of ``apply_fn``'s logits: each
parameter leaf is a kernel (``dot_general`` of the running activation [rows, in]
with a [in, out] leaf) or a bias (a [out] leaf reshaped and added right after its
kernel), and everything between kernels is elementwise. Anything else (convolutions,
shared weights, skip connections, ops that mix rows) gives ``None`` and the caller
keeps the generic path.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

# primitives that act on each element alone (with same-shape or scalar operands)
_ELEMENTWISE = frozenset(
    {
        "abs", "add", "convert_element_type", "cos", "div", "eq", "erf", "erfc",
        "exp", "exp2", "expm1", "ge", "gt", "integer_pow", "le", "log", "log1p",
        "logistic", "lt", "max", "min", "mul", "ne", "neg", "pow", "rsqrt",
        "select_n", "sign", "sin", "sqrt", "square", "stop_gradient", "sub", "tanh",
    }
)  # fmt: skip
_BATCHED = (((2,), (1,)), ((0,), (0,)))  # [c, m, k] x [c, k, n] -> [c, m, n]
_STEPS = (((2,), (2,)), ((0,), (0,)))  # [c, m, t] x [c, n, t] -> [c, m, n]


class Layer(NamedTuple):
    """z = x K (+ b) on the running activation x, then ``eqns`` from z to ``out``."""

    kernel: int  # leaf index of K [in, out]
    bias: int | None  # leaf index of b [out]
    z: Any  # jaxpr variable of z (after the bias)
    eqns: tuple  # elementwise equations from z to out
    out: Any  # the next layer's input, or the logits


class Chain(NamedTuple):
    """The logits of ``apply_fn`` as dense layers (see the module docstring)."""

    obs: Any  # jaxpr variable of the observations [rows, D]
    prefix: tuple  # elementwise equations from obs to the first layer's input
    first: Any  # the first layer's input
    layers: tuple[Layer, ...]
    consts: dict  # jaxpr constant variable -> value


def _inner_jaxprs(eqn) -> list[Jaxpr]:
    found = []
    for value in eqn.params.values():
        if isinstance(value, ClosedJaxpr):
            found.append(value.jaxpr)
        elif isinstance(value, Jaxpr):
            found.append(value)
    return found


def _is_elementwise(eqn) -> bool:
    """Whether ``eqn`` maps same-shape (or scalar) operands element by element."""
    shapes = {v.aval.shape for v in eqn.outvars}
    if len(shapes) != 1:
        return False
    (shape,) = shapes
    if any(v.aval.shape not in ((), shape) for v in eqn.invars):
        return False
    if eqn.primitive.name in _ELEMENTWISE:
        return True
    inner = _inner_jaxprs(eqn)  # custom_jvp_call (relu), jit: look inside
    return bool(inner) and all(_is_elementwise(e) for j in inner for e in j.eqns)


def dense_chain(apply_fn: Callable, params: Any, rows: int, obs_dim: int, dtype):
    """The :class:`Chain` of ``apply_fn``'s logits on [rows, obs_dim] observations,
    or None if they are not a chain of dense layers."""
    leaves, treedef = jax.tree.flatten(params)
    if any(x.dtype != jnp.float32 for x in leaves):
        return None

    def logits(leaves, obs):
        return apply_fn(jax.tree.unflatten(treedef, leaves), obs)[0]

    try:
        from jax._src.interpreters import partial_eval as pe  # no public API

        obs = jax.ShapeDtypeStruct((rows, obs_dim), dtype)
        closed = jax.make_jaxpr(logits)(leaves, obs)
        jaxpr, used = pe.dce_jaxpr(closed.jaxpr, [True])
    except Exception:  # pragma: no cover - a JAX without these internals
        return None
    kept = [i for i, u in enumerate(used) if u]
    if len(kept) != len(jaxpr.invars) or kept[-1:] != [len(leaves)]:
        return None  # the logits do not depend on the observations
    leaf_of = dict(zip(jaxpr.invars[:-1], kept[:-1], strict=True))
    return _parse(
        jaxpr, leaf_of, dict(zip(jaxpr.constvars, closed.consts, strict=True))
    )


def _is_dense_product(eqn, leaf_of: dict, live: set) -> bool:
    """Whether a ``dot_general`` is rows [n, in] x a kernel leaf [in, out]."""
    x, k = eqn.invars
    dims = eqn.params["dimension_numbers"]
    return not (
        k not in leaf_of
        or x not in live
        or x.aval.ndim != 2
        or k.aval.ndim != 2
        or tuple(map(tuple, dims[0])) != ((1,), (0,))
        or any(dims[1])
    )


def _bias_operand(eqn, z, views: dict):
    """The bias view an ``add`` adds to the pre-activation ``z`` (None if it is
    no such add)."""
    a, b = eqn.invars
    other = b if a is z else a if b is z else None
    if other in views and other.aval.shape[-1] == other.aval.size == z.aval.shape[-1]:
        return other
    return None


def _parse(jaxpr: Jaxpr, leaf_of: dict, consts: dict) -> Chain | None:
    obs = jaxpr.invars[-1]
    views = {}  # variable -> leaf index, for reshapes of a [out] leaf (biases)
    used = []  # leaf indices consumed, in order
    layers, prefix, first = [], (), None
    kernel = bias = z = None
    eqns, live = [], {obs}  # the open stage: its equations and row variables
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [v for v in eqn.invars if not isinstance(v, Literal)]
        if ins and all(v in leaf_of or v in views for v in ins):
            if len(ins) != 1:  # parameters combined (low rank, weight norm, ...)
                return None
            (v,) = ins  # a parameter's reshape: only as a bias
            if name not in ("reshape", "broadcast_in_dim") or v.aval.ndim > 1:
                return None
            views[eqn.outvars[0]] = leaf_of.get(v, views.get(v))
            continue
        if name == "dot_general":
            x, k = eqn.invars
            if not _is_dense_product(eqn, leaf_of, live):
                return None
            if z is None:
                prefix, first = tuple(eqns), x
            else:
                layers.append(Layer(kernel, bias, z, tuple(eqns), x))
            kernel, bias, z = leaf_of[k], None, eqn.outvars[0]
            used.append(kernel)
            eqns, live = [], {z}
            continue
        if name == "add" and z is not None and not eqns and bias is None:
            other = _bias_operand(eqn, z, views)
            if other is not None:
                bias, z = views[other], eqn.outvars[0]
                used.append(bias)
                live = {z}
                continue
        row = [v for v in ins if v not in consts]
        if not row or not all(v in live for v in row) or not _is_elementwise(eqn):
            return None
        if any(v.aval.shape != () for v in ins if v in consts):
            return None
        eqns.append(eqn)
        live.update(eqn.outvars)
    (out,) = jaxpr.outvars
    if z is None or out not in live or len(set(used)) != len(used):
        return None
    if set(used) != set(leaf_of.values()):
        return None  # a parameter used otherwise than as a kernel or a bias
    layers.append(Layer(kernel, bias, z, tuple(eqns), out))
    return Chain(obs, prefix, first, tuple(layers), consts)


def _run(chain: Chain, eqns: tuple, start, end, x: jax.Array) -> jax.Array:
    """Evaluate elementwise ``eqns`` from ``start`` = x to ``end``. Any layout of x
    will do (elementwise): it is viewed as the traced [rows, width]."""
    if start is end:
        return x
    env = dict(chain.consts)
    env[start] = x.reshape(start.aval.shape)
    for eqn in eqns:
        params = eqn.primitive.get_bind_params(eqn.params)  # as jax.core.eval_jaxpr
        ins = [v.val if isinstance(v, Literal) else env[v] for v in eqn.invars]
        outs = eqn.primitive.bind(*ins, **params)
        env.update(
            zip(
                eqn.outvars,
                outs if eqn.primitive.multiple_results else [outs],
                strict=True,
            )
        )
    return env[end].reshape(x.shape[0], -1, x.shape[-1])


def _block_grads(chain: Chain, leaves: list, obs, actions, weights):
    """One block: obs [c, D, t], actions [c, t], weights [c, F, t] -> per layer
    (layer, [c, F, (1 + in) * out] or [c, F, in * out] without a bias)."""
    columns, num_weights, _ = weights.shape

    def batched(m):  # [m, k] -> [c, m, k]: one product per column
        return jnp.broadcast_to(m, (columns, *m.shape))

    x = _run(chain, chain.prefix, chain.obs, chain.first, obs)
    inputs, slopes = [], []
    for layer in chain.layers:
        inputs.append(x)
        z = jax.lax.dot_general(batched(leaves[layer.kernel].T), x, _BATCHED)
        if layer.bias is not None:
            z = z + leaves[layer.bias][:, None]
        if layer.eqns:
            x, slope = jax.jvp(
                lambda z, layer=layer: _run(chain, layer.eqns, layer.z, layer.out, z),
                (z,),
                (jnp.ones_like(z),),
            )
        else:
            x, slope = z, None
        slopes.append(slope)
    # d log softmax(x)[a] / dx = onehot(a) - softmax(x), x the logits [c, A, t]
    delta = jax.nn.one_hot(actions, x.shape[1], axis=1) - jax.nn.softmax(x, axis=1)
    grads = []
    for i in reversed(range(len(chain.layers))):
        layer = chain.layers[i]
        if slopes[i] is not None:
            delta = delta * slopes[i]
        x, w = inputs[i], weights[:, :, None]  # [c, in, t], [c, F, 1, t]
        bias = layer.bias is not None
        if x.shape[1] + bias <= delta.shape[1]:  # weight the smaller side
            parts = [w, w * x[:, None]] if bias else [w * x[:, None]]
            weighted = jnp.concatenate(parts, 2).reshape(columns, -1, x.shape[-1])
            g = jax.lax.dot_general(weighted, delta, _STEPS)  # [c, F (1 + in), out]
        else:  # e.g. the logits layer: F out rows instead of F (1 + in)
            weighted = (w * delta[:, None]).reshape(columns, -1, x.shape[-1])
            g = jax.lax.dot_general(x, weighted, _STEPS)  # [c, in, F out]
            if bias:
                g = jnp.concatenate([jnp.sum(weighted, -1)[:, None], g], 1)
            g = g.reshape(columns, g.shape[1], num_weights, -1).swapaxes(1, 2)
        grads.append((layer, g.reshape(columns, num_weights, -1)))
        if i:
            delta = jax.lax.dot_general(batched(leaves[layer.kernel]), delta, _BATCHED)
    return grads


def dense_column_grads(
    apply_fn: Callable,
    params: Any,
    columns: tuple[jax.Array, jax.Array, jax.Array],
    block_columns: int | None = None,
    multiple: int = 1,
    out: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, ...] | None:
    """Per column c and weighting f, sum_t weights[t, c, f] grad log pi(a_t|s_t)
    as flat vectors (``ravel_pytree`` order), or None if ``apply_fn``'s logits are
    not a chain of dense layers (see the module docstring).

    Args:
      apply_fn: ``(params, obs [..., D]) -> (logits [..., A], value)``.
      params: the policy's parameters (float32 leaves).
      columns: observations [T, C, D], actions [T, C], weights [T, C, F], padding
        zeroed.
      block_columns: columns per cache-sized block (a multiple of ``multiple``
        dividing C); None: one block.
      multiple: devices the columns are sharded over: each block takes
        ``block_columns / multiple`` consecutive columns of every device's share.
      out: F arrays [C, P] returned by an earlier call, to write the results
        into: the entries of leaves the logits use are written over, the others
        (a critic's) are left as they are, i.e. zero. None: fresh zeros.

    Returns:
      F arrays [C, P], one per weighting.
    """
    observations, actions, weights = columns
    if observations.ndim != 3:
        return None
    horizon, num, obs_dim = observations.shape
    size = num if block_columns is None else block_columns
    if size < 1 or num % size or size % multiple:
        raise ValueError(
            f"block_columns ({size}) must divide the columns ({num}) and be a "
            f"multiple of the device count ({multiple})"
        )
    chain = dense_chain(apply_fn, params, size * horizon, obs_dim, observations.dtype)
    if chain is None:
        return None
    leaves = jax.tree.leaves(params)
    offsets = [0]
    for leaf in leaves:
        offsets.append(offsets[-1] + leaf.size)
    local, per_block = num // multiple, size // multiple

    def by_device(x):  # [T, C, ...] -> [devices, C / devices, ..., T]
        x = jnp.moveaxis(x, 0, -1)
        return x.reshape(multiple, local, *x.shape[1:])

    obs, acts, wts = by_device(observations), by_device(actions), by_device(weights)

    def block(b, outs):
        def cut(x):  # this block's columns of every device -> [size, ..., T]
            x = jax.lax.dynamic_slice_in_dim(x, b * per_block, per_block, 1)
            return x.reshape(size, *x.shape[2:])

        grads = _block_grads(chain, leaves, cut(obs), cut(acts), cut(wts))
        start = (0, b * per_block)
        return tuple(
            _write_block(out, grads, f, leaves, offsets, start, multiple)
            for f, out in enumerate(outs)
        )

    if out is None:
        zeros = jnp.zeros((multiple, local, offsets[-1]), jnp.float32)
        out = (zeros,) * weights.shape[-1]
    else:
        out = tuple(o.reshape(multiple, local, offsets[-1]) for o in out)
    outs = jax.lax.fori_loop(0, num // size, block, out)
    return tuple(out.reshape(num, -1) for out in outs)


def _write_block(out, grads, f: int, leaves, offsets, start, multiple: int):
    """``out`` [devices, C / devices, P] with weighting f's gradients of a block
    written at column ``start`` and each leaf's offset (bias then kernel of a
    layer in one write where they are adjacent)."""
    for layer, g in grads:
        parts = [(layer.kernel, g[:, f])]
        if layer.bias is not None:
            width = leaves[layer.bias].size
            parts = [
                (layer.bias, g[:, f, :width]),
                (layer.kernel, g[:, f, width:]),
            ]
            if offsets[layer.bias] + width == offsets[layer.kernel]:
                parts = [(layer.bias, g[:, f])]  # bias then kernel: one write
        for leaf, part in parts:
            part = part.reshape(multiple, -1, part.shape[-1])
            out = jax.lax.dynamic_update_slice(out, part, (*start, offsets[leaf]))
    return out
