"""A plain NumPy Llama forward, written for clarity and never optimised: the oracle for the Flax model.

Takes jaxserve's parameter tree (kernels [in, out]) and computes logits for one token sequence with a
causal mask, no cache.
"""

import jax
import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, theta):
    """Rotate-half RoPE on x [T, heads, H]."""
    H = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, H, 2) / H)
    angles = positions[:, None] * inv_freq[None, :]  # [T, H/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def forward(cfg, params, tokens):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = p["embed"]["embedding"][np.array(tokens)]
    group = cfg.n_heads // cfg.n_kv_heads
    causal = np.tril(np.ones((T, T), bool))
    lp = p["layers"]
    for i in range(cfg.n_layers):
        h = rms_norm(x, lp["attn_norm"]["scale"][i], cfg.norm_eps)
        q = rope(np.einsum("td,dnh->tnh", h, lp["q"][i]), pos, cfg.rope_theta)
        k = rope(np.einsum("td,dkh->tkh", h, lp["k"][i]), pos, cfg.rope_theta)
        v = np.einsum("td,dkh->tkh", h, lp["v"][i])
        out = np.zeros_like(q)
        for n in range(cfg.n_heads):
            kv = n // group
            s = q[:, n] @ k[:, kv].T / np.sqrt(cfg.head_dim)
            s = np.where(causal, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, n] = w @ v[:, kv]
        x = x + np.einsum("tnh,nhd->td", out, lp["o"][i])
        h = rms_norm(x, lp["mlp_norm"]["scale"][i], cfg.norm_eps)
        gate, up = h @ lp["gate_up"][i][:, 0], h @ lp["gate_up"][i][:, 1]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ lp["down"][i]
    x = rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head
