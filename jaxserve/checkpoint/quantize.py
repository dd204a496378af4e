"""Weight-only int8: symmetric, one float32 scale per output channel and group of `group` input weights,
matching transformer._weight's layout (`name` int8 kernel + `name_scale` of the kernel's rank, its grouped
input axis shrunk by the group). Norms stay in the model's float dtype.

Groups, not whole channels: SmolLM2's GGUF weights are Q4_1, each group of 32 inputs on its own grid, so
one scale per channel spends int8's levels on the channel's widest group; per-group scales (64) keep the
model much closer to float32 (tests/test_quantize.py holds the bounds) at the same matmul speed."""

from __future__ import annotations

import numpy as np

# parameter -> its grouped input axis in the stored array (layers stacked first): the last input axis
GROUPED_AXIS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate_up": 1, "down": 1, "embedding": 1, "lm_head": 0}

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_array(w: np.ndarray, axis: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """w ~ q * scale (scale repeated `group` times along `axis`), q int8 in [-127, 127].

    Each group's scale clips its range at the ratio (of its largest magnitude) that minimises the squared
    error: a few outliers then cost less precision to everything else."""
    w = np.asarray(w, np.float32)
    n = w.shape[axis]
    assert n % group == 0, (w.shape, axis, group)
    g = w.reshape(*w.shape[:axis], n // group, group, *w.shape[axis + 1 :])  # the group's members on axis+1
    peak = np.max(np.abs(g), axis=axis + 1, keepdims=True)
    peak = np.where(peak > 0, peak, 1.0)
    best_err, best_scale = None, None
    for ratio in CLIP_RATIOS:
        scale = (peak * ratio / 127.0).astype(np.float32)
        err = np.sum((np.clip(np.rint(g / scale), -127, 127) * scale - g) ** 2, axis=axis + 1, keepdims=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    q = np.clip(np.rint(g / best_scale), -127, 127).astype(np.int8).reshape(w.shape)
    return q, np.squeeze(best_scale, axis=axis + 1)
