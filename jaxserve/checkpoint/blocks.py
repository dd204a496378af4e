"""Matmul weights as GGUF block parameters (jaxserve.model.blocks): a GGUF file's own blocks, or float
weights quantized into blocks (`--quantize int4`).

`--quantize gguf` serves a GGUF file's Q4_0, Q4_1 and Q8_0 tensors as the file stores them: the codes, d
and m of every block are copied, never dequantized and quantized again. A weight is one parameter stacked
over the layers and has one format, so where a file gives the layers of one weight different types
(Gemma 3 270M's "Q4_K_M" mixes Q5_0, Q8_0 and Q6_K in one weight), or a type served otherwise (K-quants,
Q5_*, floats), that weight is dequantized and quantized into Q8_0 (gguf's own quantizer): the closest of
the three to any source, at 34 bytes a block. The log names each such weight.

`--quantize int4` quantizes float weights (a Hugging Face checkpoint, or any GGUF) as llama.cpp's Q4_1
files are: the layers' matmuls Q4_1 (blocks of 32 inputs, each with its own d and m), the embedding and an
untied output projection Q8_0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from jaxserve.checkpoint.gguf_import import (
    _target,
    check_type,
    dequantize,
    read_config,
    read_tokenizer,
    unpermute_rope,
)
from jaxserve.checkpoint.quantize import GROUPED_AXIS
from jaxserve.checkpoint.stream import Piece, check_complete, leaf_shapes
from jaxserve.model import blocks
from jaxserve.model.config import ModelConfig

log = logging.getLogger(__name__)

T = gguf.GGMLQuantizationType
SERVED = {T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q8_0: "q8_0"}  # GGUF types whose blocks are served as they are
REQUANTIZED = "q8_0"  # a weight in any other type, or in several
TABLES = ("embedding", "lm_head")  # kept at 8 bits by --quantize int4, as llama.cpp's Q4_1 files keep them


def with_formats(cfg: ModelConfig, formats: dict[str, str]) -> ModelConfig:
    return dataclasses.replace(cfg, quant="blocks", block_formats=tuple(sorted(formats.items())))


def open_gguf_blocks(path: Path, max_context: int | None = None, progress: bool = True):
    """(config with quant "blocks", parameter pieces, tokenizer) of a GGUF file, its matmul weights' blocks
    as stored (see the module's note for the weights that are not)."""
    reader = gguf.GGUFReader(str(path))
    cfg = read_config(reader, max_context)
    plan, types = [], {}
    for t in reader.tensors:
        target = _target(t.name, cfg)
        if target is None:
            continue  # rope_freqs (read into the config); open_params refuses other names
        check_type(t)
        plan.append((t, target))
        if target[0][-1] in GROUPED_AXIS:
            types.setdefault(target[0][-1], set()).add(t.tensor_type)
    check_complete([(leaf, index) for _, (leaf, index, _) in plan], cfg, "GGUF file")
    formats = {}
    for name, kinds in types.items():
        (kind,) = kinds if len(kinds) == 1 else (None,)
        formats[name] = SERVED.get(kind, REQUANTIZED)
        if kind not in SERVED:
            log.info("%s: GGUF types %s, quantized into %s", name, "/".join(k.name for k in kinds), formats[name])
    cfg = with_formats(cfg, formats)
    shapes = leaf_shapes(cfg)

    def pieces():
        for t, (path, index, transform) in tqdm(plan, desc="reading blocks", unit="tensor", disable=not progress):
            name = path[-1]
            if name not in formats:
                yield path, index, transform(dequantize(t))
                continue
            fmt = formats[name]
            rows = SERVED.get(t.tensor_type) == fmt
            parts = blocks.from_gguf(t.data, fmt) if rows else blocks.quantize(dequantize(t), fmt)
            if name in ("q", "k") and not cfg.qk_norm:  # llama.cpp's pairwise RoPE rows, as gguf_import undoes
                heads = cfg.n_heads if name == "q" else cfg.n_kv_heads
                parts = tuple(unpermute_rope(p, heads) for p in parts)
            yield from _pieces(path, index, parts, fmt, shapes)

    return cfg, pieces(), read_tokenizer(reader)


def _pieces(path, index, parts, fmt: str, shapes) -> Iterator[Piece]:
    """A weight's parts [N, ...] as pieces of its block parameters, outputs shaped as the parameter has them
    (the float layout's input axis, None in a gate/up index, is not an axis of theirs)."""
    index = tuple(i for i in index if i is not None)
    for suffix, part in zip(blocks.parts(fmt), parts):
        leaf = (*path[:-1], path[-1] + suffix)
        yield leaf, index, part.reshape(shapes[leaf].shape[len(index) :])


def int4_pieces(pieces: Iterable[Piece], cfg: ModelConfig) -> tuple[ModelConfig, Iterator[Piece]]:
    """(config with quant "blocks", pieces) of float pieces in the model's layout: the layers' matmul
    weights into Q4_1 blocks, the embedding and an untied output projection into Q8_0."""
    names = {path[-1] for path in leaf_shapes(cfg)} & set(GROUPED_AXIS)
    formats = {n: "q8_0" if n in TABLES else "q4_1" for n in names}
    cfg = with_formats(cfg, formats)
    shapes = leaf_shapes(cfg)

    def convert():
        for path, index, value in pieces:
            name = path[-1]
            if name not in formats:
                yield path, index, value
                continue
            a = GROUPED_AXIS[name] - sum(1 for i in index[: GROUPED_AXIS[name]] if i is not None)
            if a == value.ndim - 1:  # the embedding [V, D]: output channels first already
                rows = value.reshape(value.shape[0], -1)
            else:  # inputs first: [K, N] -> [N, K]
                rows = value.reshape(math.prod(value.shape[: a + 1]), -1).T
            yield from _pieces(
                path, index, blocks.quantize(np.ascontiguousarray(rows), formats[name]), formats[name], shapes
            )

    return cfg, convert()
