"""LoRA adapters applied per row inside the model: the stacked weights of every resident adapter, declared
once, and the low-rank update each projection adds.

The stack holds `M` adapters of rank up to `R` (a smaller rank is zero-padded: the product is unchanged)
for each target, stacked over the layers like the base weights: A [L, inputs..., M, R] and
B [L, M, R, outputs...] (gate_up's B [L, 2, M, R, F]), inputs and outputs shaped as the base kernel's,
the adapter's scale folded into B. These are the layouts the step's two matmuls read as they are: x . A
is one matmul over every adapter's columns and u . B contracts (M, R) in place (A stored [L, M, ...],
XLA copied every layer's A into this order each step). Its shapes never change, so loading an adapter
writes into it and compiles nothing. An adapter that does not target a projection has zeros there.

Each row of a step (a slot, or a prefill row) carries an adapter index: 0 = the base alone, i >= 1 = stack
entry i - 1. The update is a masked product over the whole stack: u = x . A for every resident adapter
[B, T, M, R], zeroed but for the row's own adapter, then u . B contracted over (M, R) at once. Each
adapter's weights are read once a step whatever the rows, and never copied per row (a per-row gather of
rank-16 adapters on the seven projections of SmolLM2 moves about 0.5 GB a step at 32 rows); what it
costs is M * R more columns per projection. A step none of whose rows has an adapter skips the update
(one predicate for the step, a conditional per projection). scripts/bench_lora.py measures the masked
product against a grouped product (rows sorted by adapter, jax.lax.ragged_dot) and the per-row gather.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.config import ModelConfig

# target -> (input letters of x [B, T, inputs...], A's letters, B's letters); y's letters are "bt" + B's
# without m and r. d: D, n: N, k: K, h: H, f: F, c: gate or up, m: the stack's entry, r: the rank.
TARGETS = {
    "q": ("d", "dmr", "mrnh"),
    "k": ("d", "dmr", "mrkh"),
    "v": ("d", "dmr", "mrkh"),
    "o": ("nh", "nhmr", "mrd"),
    "gate_up": ("d", "dcmr", "cmrf"),
    "down": ("f", "fmr", "mrd"),
}
AXES = {"d": "embed", "n": "q_heads", "k": "kv_heads", "h": "head_dim", "f": "mlp", "c": None, "m": None, "r": None}


def _sizes(cfg: ModelConfig, adapters: int, rank: int) -> dict[str, int]:
    return dict(d=cfg.dim, n=cfg.n_heads, k=cfg.n_kv_heads, h=cfg.head_dim, f=cfg.mlp_dim, c=2, m=adapters, r=rank)


def stack_shapes(cfg: ModelConfig, adapters: int, rank: int) -> dict:
    """{target: (A, B)} as jax.ShapeDtypeStruct [L, ...], float32."""
    size = _sizes(cfg, adapters, rank)
    shape = lambda letters: jax.ShapeDtypeStruct((cfg.n_layers, *(size[x] for x in letters)), jnp.float32)
    return {t: (shape(a), shape(b)) for t, (_, a, b) in TARGETS.items()}


def stack_axes() -> dict:
    """{target: (A's logical axes, B's)}: sharded as the base weights they update."""
    axes = lambda letters: ("layers", *(AXES[x] for x in letters))
    return {t: (axes(a), axes(b)) for t, (_, a, b) in TARGETS.items()}


def entry(weights: dict, cfg: ModelConfig, rank: int) -> dict:
    """One adapter's {target: (A [L, ...], B [L, ...])} (jaxserve.checkpoint.peft's layout, any rank <= `rank`)
    as a whole stack entry in NumPy, the stack's layout without its M axis: every target, zero-padded to
    `rank`, zeros where not targeted."""
    size = _sizes(cfg, 0, rank)
    out = {}
    for t, (_, a_letters, b_letters) in TARGETS.items():
        a_letters, b_letters = a_letters.replace("m", ""), b_letters.replace("m", "")
        a = np.zeros((cfg.n_layers, *(size[x] for x in a_letters)), np.float32)
        b = np.zeros((cfg.n_layers, *(size[x] for x in b_letters)), np.float32)
        if t in weights:
            wa, wb = weights[t]
            r = wa.shape[-1]
            a[..., :r] = wa
            b[(slice(None),) * (1 + b_letters.index("r")) + (slice(0, r),)] = wb
        out[t] = (a, b)
    return out


def write(stack: dict, index, entry: dict) -> dict:
    """`stack` (jax arrays) with `entry` (see `entry`) as its entry `index` (0-based; a traced int is fine)."""
    out = {}
    for t, (_, a_letters, b_letters) in TARGETS.items():
        at = lambda letters: (slice(None),) * (1 + letters.index("m")) + (index,)
        (a, b), (ea, eb) = stack[t], entry[t]
        out[t] = (a.at[at(a_letters)].set(ea), b.at[at(b_letters)].set(eb))
    return out


class Route(NamedTuple):
    """Which adapter each row of a step computes with, derived once a step from the rows' indices."""

    mask: jax.Array  # [B, M] float32: one-hot of each row's stack entry (index 0: all zeros)
    any: jax.Array  # bool []: some row has an adapter


def route(stack: dict, index) -> Route:
    """The rows' adapter indices [B] (0: the base) against `stack`'s M entries."""
    mask = jax.nn.one_hot(index - 1, stack["q"][1].shape[1], dtype=jnp.float32)
    return Route(mask, (index > 0).any())


def delta(target: str, x, weights, mask):
    """The update of projection `target` for x [B, T, inputs...] under one layer's `weights` (A, B without
    the L axis) and the rows' `mask` [B, M]: float32, shaped as the base projection's output."""
    inputs, a_letters, b_letters = TARGETS[target]
    a, b = weights
    u_letters = "bt" + a_letters[len(inputs) :]
    u = jnp.einsum(f"bt{inputs},{a_letters}->{u_letters}", x.astype(jnp.float32), a)
    u = u * mask.reshape(mask.shape[0], 1, *(mask.shape[1] if c == "m" else 1 for c in u_letters[2:]))
    return jnp.einsum(f"{u_letters},{b_letters}->bt{b_letters.replace('m', '').replace('r', '')}", u, b)


def apply(target: str, y, x, weights, rows: Route):
    """The base projection's output y with each row's update of `target` added (y itself when no row of the
    step has an adapter)."""
    return jax.lax.cond(rows.any, lambda: y + delta(target, x, weights, rows.mask).astype(y.dtype), lambda: y)
