"""LoRA adapters applied per row inside the model: the stacked weights of every resident adapter, declared
once, and the low-rank update each projection adds.

The stack holds `M` adapters of rank up to `R` (a smaller rank is zero-padded: the product is unchanged)
for each target, stacked over the layers like the base weights: A [L, M, inputs..., R] and
B [L, M, R, outputs...], inputs and outputs shaped as the base kernel's, the adapter's scale folded into
B. Its shapes never change, so loading an adapter writes into it and compiles nothing. An adapter that
does not target a projection has zeros there.

Each row of a step (a slot, or a prefill row) carries an adapter index: 0 = the base alone, i >= 1 = stack
entry i - 1. The update is a masked product over the whole stack: u = x . A for every resident adapter
[B, T, M, R], zeroed but for the row's own adapter, then u . B contracted over (M, R) at once. Each
adapter's weights are read once a step whatever the rows, and never copied per row (a per-row gather of
rank-16 adapters on the seven projections of SmolLM2 moves about 0.5 GB a step at 32 rows); what it
costs is M * R more columns per projection. scripts/bench_lora.py measures it against a grouped product
(rows sorted by adapter, jax.lax.ragged_dot) and the per-row gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.config import ModelConfig

# target -> (input letters of x [B, T, inputs...], A's letters after M, B's letters after M); y's letters
# are "bt" + B's without r. d: D, n: N, k: K, h: H, f: F, c: gate or up, r: the rank.
TARGETS = {
    "q": ("d", "dr", "rnh"),
    "k": ("d", "dr", "rkh"),
    "v": ("d", "dr", "rkh"),
    "o": ("nh", "nhr", "rd"),
    "gate_up": ("d", "dcr", "crf"),
    "down": ("f", "fr", "rd"),
}
AXES = {"d": "embed", "n": "q_heads", "k": "kv_heads", "h": "head_dim", "f": "mlp", "c": None, "r": None}


def _sizes(cfg: ModelConfig, rank: int) -> dict[str, int]:
    return dict(d=cfg.dim, n=cfg.n_heads, k=cfg.n_kv_heads, h=cfg.head_dim, f=cfg.mlp_dim, c=2, r=rank)


def stack_shapes(cfg: ModelConfig, adapters: int, rank: int) -> dict:
    """{target: (A, B)} as jax.ShapeDtypeStruct [L, M, ...], float32."""
    size = _sizes(cfg, rank)
    shape = lambda letters: jax.ShapeDtypeStruct((cfg.n_layers, adapters, *(size[x] for x in letters)), jnp.float32)
    return {t: (shape(a), shape(b)) for t, (_, a, b) in TARGETS.items()}


def stack_axes() -> dict:
    """{target: (A's logical axes, B's)}: sharded as the base weights they update."""
    axes = lambda letters: ("layers", None, *(AXES[x] for x in letters))
    return {t: (axes(a), axes(b)) for t, (_, a, b) in TARGETS.items()}


def entry(weights: dict, cfg: ModelConfig, rank: int) -> dict:
    """One adapter's {target: (A [L, ...], B [L, ...])} (jaxserve.checkpoint.peft's layout, any rank <= `rank`)
    as a whole stack entry in NumPy: every target, zero-padded to `rank`, zeros where not targeted."""
    size = _sizes(cfg, rank)
    out = {}
    for t, (_, a_letters, b_letters) in TARGETS.items():
        a = np.zeros((cfg.n_layers, *(size[x] for x in a_letters)), np.float32)
        b = np.zeros((cfg.n_layers, *(size[x] for x in b_letters)), np.float32)
        if t in weights:
            wa, wb = weights[t]
            r = wa.shape[-1]
            a[..., :r] = wa
            b[(slice(None),) * (1 + b_letters.index("r")) + (slice(0, r),)] = wb
        out[t] = (a, b)
    return out


def row_mask(index, adapters: int):
    """Each row's adapter index [B] -> its one-hot over the stack [B, M] float32 (index 0: all zeros)."""
    return jax.nn.one_hot(index - 1, adapters, dtype=jnp.float32)


def delta(target: str, x, weights, mask):
    """The update of projection `target` for x [B, T, inputs...] under one layer's `weights` (A [M, ...],
    B [M, ...]) and the rows' `mask` [B, M]: float32, shaped as the base projection's output."""
    inputs, a_letters, b_letters = TARGETS[target]
    a, b = weights
    u_letters = "btm" + "".join(x for x in a_letters if x not in inputs)
    u = jnp.einsum(f"bt{inputs},m{a_letters}->{u_letters}", x.astype(jnp.float32), a)
    u = u * mask.reshape(mask.shape[0], 1, mask.shape[1], *(1,) * (u.ndim - 3))
    return jnp.einsum(f"{u_letters},m{b_letters}->bt{b_letters.replace('r', '')}", u, b)
