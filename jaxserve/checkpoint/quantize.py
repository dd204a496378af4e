"""Weight-only int8: symmetric, one float32 scale per output channel, matching transformer._weight's layout
(`name` int8 kernel + `name_scale`). Norms stay in the model's float dtype."""

from __future__ import annotations

import numpy as np

# parameter -> its input (reduced) axes, counted in the stored array (layers stacked first)
_INPUT_AXES = {"q": (1,), "k": (1,), "v": (1,), "o": (1, 2), "gate": (1,), "up": (1,), "down": (1,),
               "embedding": (1,), "lm_head": (0,)}


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_array(w: np.ndarray, input_axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """w ~ q * scale, q int8 in [-127, 127], scale per output channel (the non-input axes).

    Each channel's scale clips its range at the ratio (of its largest magnitude) that minimises the squared
    error: a few outliers then cost less precision to everything else."""
    w = np.asarray(w, np.float32)
    peak = np.max(np.abs(w), axis=input_axes, keepdims=True)
    peak = np.where(peak > 0, peak, 1.0)
    best_err, best_scale = None, None
    for ratio in CLIP_RATIOS:
        scale = (peak * ratio / 127.0).astype(np.float32)
        err = np.sum((np.clip(np.rint(w / scale), -127, 127) * scale - w) ** 2, axis=input_axes, keepdims=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    q = np.clip(np.rint(w / best_scale), -127, 127).astype(np.int8)
    return q, np.squeeze(best_scale, axis=input_axes)


def quantize_params(params: dict) -> dict:
    """A float parameter tree ({'params': ...}) -> the int8 tree of the same model."""
    def walk(tree: dict) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value)
            elif name in _INPUT_AXES:
                out[name], out[name + "_scale"] = quantize_array(value, _INPUT_AXES[name])
            else:
                out[name] = value
        return out
    return walk(params)
