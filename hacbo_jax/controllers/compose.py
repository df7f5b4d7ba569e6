"""Helpers to compose the controllers with optax wrappers that hide what they need.

``optax.MultiSteps`` accumulates the gradient and calls the inner transformation with the
accumulation, but forwards the caller's extra arguments unchanged: ``train_grads`` would be the
last mini-batch's gradient and ``dev_grad_fn`` would be evaluated on every mini-step.
:func:`train_grads_from_updates` gives the controller the gradient its chain receives (the
accumulation, under MultiSteps) and :func:`accumulate_gradients` also evaluates the dev gradient
only on the mini-step that emits an update. :func:`dev_sign_sketch` shrinks a dev gradient to
what HACBO and BLAC read of it (its signs), so it can be computed by a separate program.
:func:`outside_controllers` makes ``optax.tree.get(state, "count", ...)`` find the base
optimiser's count next to a controller's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hacbo_jax.controllers._groups import STACKED, UNCONTROLLED, pack_sign_codes, resolve_layout
from hacbo_jax.controllers.adagradselect import AdaGradSelectState
from hacbo_jax.controllers.blac import BLACState
from hacbo_jax.controllers.hacbo import HACBOState

PyTree = Any


def train_grads_from_updates(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Calls ``inner`` with ``train_grads`` = the updates this transformation receives.

    Wrap the whole chain (``train_grads_from_updates(optax.chain(optax.adamw(lr), hacbo(...)))``)
    so that the controller sees the gradient the chain was given; inside ``optax.MultiSteps``
    that is the accumulated gradient. The caller must not pass ``train_grads`` itself.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        if "train_grads" in extra_args:
            raise ValueError(
                "train_grads_from_updates passes the updates it receives as train_grads; "
                "do not pass train_grads=... as well"
            )
        return inner.update(updates, state, params, train_grads=updates, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def accumulate_gradients(
    inner: optax.GradientTransformation, every_k: int, **multi_steps_kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """``optax.MultiSteps`` for a chain that contains a controller.

    Equivalent to ``optax.MultiSteps(train_grads_from_updates(inner), every_k, ...)`` (the state
    is a ``optax.MultiStepsState``; the controller's is in ``state.inner_opt_state``), with two
    rules: the controller sees the accumulated gradient as ``train_grads``, and a ``dev_grad_fn``
    passed to ``update`` is evaluated only on the mini-step that emits the update (inside
    ``lax.cond``; the other mini-steps' controller states are discarded by MultiSteps anyway), so
    once per optimiser step. ``update(grads, state, params, dev_grad_fn=...)`` takes the
    mini-batch gradient and no ``train_grads``. The controller's count and K-cadence follow the
    optimiser steps. ``multi_steps_kwargs`` go to ``optax.MultiSteps`` (e.g. ``use_grad_mean``).
    """
    if not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1:
        raise ValueError(f"every_k must be an integer >= 1, got {every_k!r}")
    multi = optax.MultiSteps(train_grads_from_updates(inner), every_k, **multi_steps_kwargs)

    def update_fn(updates, state, params=None, *, dev_grad_fn=None, **extra_args):
        if dev_grad_fn is not None:
            emits = state.mini_step == every_k - 1
            real_fn = dev_grad_fn

            def dev_grad_fn(p):
                shapes = jax.eval_shape(real_fn, p)
                return jax.lax.cond(emits, real_fn, lambda _: optax.tree.zeros_like(shapes), p)

            extra_args["dev_grad_fn"] = dev_grad_fn
        return multi.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(multi.init, update_fn)


def controlled_leaves(labels: Any, params: PyTree) -> PyTree:
    """A tree like ``params`` with True at every leaf that HACBO or BLAC over ``labels``
    controls (``"{block}/{submodule}"`` or ``"*/{submodule}"``) and False elsewhere (for example
    the embeddings and the final norm of :func:`~hacbo_jax.trainer.recipes.qwen3_labels`).

    The controllers read nothing of the other leaves' gradients: a dev gradient taken with
    respect to the controlled leaves only (``make_dev_signs_fn(..., controlled=...)``) measures
    exactly as the full one does and skips, on a model with tied embeddings, the vocabulary
    projection's weight gradient.
    """
    layout = resolve_layout(labels, params, None, allow_stacked=True)
    return layout.treedef.unflatten([b != UNCONTROLLED for b in layout.leaf_block])


def zero_blocks(labels: Any, tree: PyTree, blocks: jax.Array) -> PyTree:
    """``tree`` (params-shaped, e.g. a gradient) with every leaf of the blocks that ``blocks``
    (bool[B]) marks set to exactly 0: a ``"{b}/{submodule}"`` leaf when ``blocks[b]``, slice b
    of a stacked ``"*/{submodule}"`` leaf; other leaves unchanged. ``jnp.where``, so a NaN in a
    zeroed block does not survive.

    This is the gradient a training step sees when it skips those blocks' weight gradients:
    the step zeroes the blocks' remaining (norm, bias) gradients with it, and a dense step
    that applies it gives the skipping step's exact reference.
    """
    layout = resolve_layout(labels, tree, None, allow_stacked=True)
    leaves = layout.treedef.flatten_up_to(tree)
    out = []
    for leaf, b in zip(leaves, layout.leaf_block):
        if b == UNCONTROLLED or not isinstance(leaf, jax.Array):
            out.append(leaf)
        elif b == STACKED:
            mask = blocks[: leaf.shape[0]].reshape((leaf.shape[0],) + (1,) * (leaf.ndim - 1))
            out.append(jnp.where(mask, jnp.zeros_like(leaf), leaf))
        else:
            out.append(jnp.where(blocks[b], jnp.zeros_like(leaf), leaf))
    return layout.treedef.unflatten(out)


# The sketch of a leaf no controller reads (dev_sign_sketch with ``controlled``).
def _empty_sketch() -> jax.Array:
    return jnp.zeros((0, 0), jnp.uint8)


def dev_sign_sketch(dev_grads: PyTree, controlled: PyTree | None = None) -> PyTree:
    """The dev gradient as its signs, two bits per coordinate: each leaf becomes
    ``uint8[rows, ceil(n / 4)]`` (:func:`~hacbo_jax.controllers._groups.sketch_shape`: the
    leading, block, axis kept, the rest flattened), codes 0 for zero, 1 for positive, 2 for
    negative and 3 for NaN or +-inf, four to a byte.

    HACBO and BLAC read only sign(g_dev) of the dev gradient (the sign-cosine, step 1 of docs/algorithm.md) and
    whether it is finite, so ``update(..., dev_grads=dev_sign_sketch(g_dev))`` measures exactly
    as ``dev_grads=g_dev`` does (the paper's 1-bit sketch, plus the zero and non-finite cases a
    1-bit sign cannot hold): a sketch with a code 3 counts as a non-finite dev gradient, so the
    measurement is skipped just the same. Its use: compute the sketch in its own jitted program
    before the training step, which then holds a sixteenth of an fp32 gradient instead of a
    second one (the two programs' peaks do not add up). The statistics unpack it slice by slice.
    With ``controlled`` (:func:`controlled_leaves`), the leaves marked False become an empty
    ``uint8[0, 0]`` (the controllers never read them) and may be None in ``dev_grads``.
    (Packed bits rather than one int8 a coordinate: on Qwen3-0.6B the int8 sketch was 0.55 GiB,
    6.7% of the HACBO run's peak above plain AdamW's; float8, which could hold NaN, is worse:
    XLA's CPU backend converts a float8 array to float32 whole.)
    """
    if controlled is None:
        return jax.tree.map(pack_sign_codes, dev_grads)
    return jax.tree.map(
        lambda keep, g: pack_sign_codes(g) if keep else _empty_sketch(), controlled, dev_grads
    )


def outside_controllers(path: tuple[Any, ...], value: Any) -> bool:
    """A ``filtering`` for ``optax.tree.get`` / ``optax.tree.set``: False for the fields of the
    controllers' own states (:class:`~hacbo_jax.HACBOState`, :class:`~hacbo_jax.BLACState`,
    :class:`~hacbo_jax.AdaGradSelectState`), True for everything else.

    A controller's state has a ``count`` of its own, so next to AdamW
    ``optax.tree.get(state, "count")`` finds two and raises (optax's rule: a lookup must be
    unambiguous). ``optax.tree.get(state, "count", filtering=outside_controllers)`` finds the
    base optimiser's, whatever the base (Adam's, Lion's, ...), also inside AdaGradSelect's
    ``inner``; the same filter selects it for ``optax.tree.set``. The controller's own count is
    ``optax.tree.get(state, "HACBOState").count``. (Other optax wrappers keep counts of their
    own, e.g. ``inject_hyperparams``: filter those by name, as for plain optax.)
    """
    del value
    last = path[-1] if path else None
    return getattr(last, "tuple_name", None) not in _CONTROLLER_STATE_NAMES


# The controllers' state types, by name (as optax's NamedTupleKey spells them).
_CONTROLLER_STATE_NAMES = frozenset(
    cls.__name__ for cls in (HACBOState, BLACState, AdaGradSelectState)
)
