"""Checkpoints: GGUF and Hugging Face import, orbax save/restore onto a mesh, model cards. Imports model/, never
the server."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from jaxserve.checkpoint.blocks import int4_pieces, open_gguf_blocks
from jaxserve.checkpoint.cards import DEFAULT_MODEL, ModelCard, find_card, gguf_path, list_cards
from jaxserve.checkpoint.gguf_import import open_gguf, read_chat_template
from jaxserve.checkpoint.hf_import import is_hf_directory, open_hf
from jaxserve.checkpoint.hf_import import read_chat_template as read_hf_chat_template
from jaxserve.checkpoint.store import is_checkpoint, is_stale_checkpoint, load_checkpoint, save_checkpoint
from jaxserve.checkpoint.stream import place, quantize_pieces
from jaxserve.model import LoadedModel
from jaxserve.sharding import make_mesh

log = logging.getLogger(__name__)

QUANTIZE = ("int8", "int4", "gguf")  # --quantize: int8 groups, Q4_1 blocks, a GGUF file's own blocks
SOURCE = "source"  # in a checkpoint converted from a Hugging Face directory: that directory's path

__all__ = [
    "DEFAULT_MODEL",
    "ModelCard",
    "checkpoint_name",
    "convert",
    "convert_gguf",
    "convert_hf",
    "ensure_checkpoint",
    "find_card",
    "list_cards",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]


def _write(cfg, pieces, tokenizer, out_dir: Path, quantize: str | None, mesh) -> None:
    """Stream the pieces (int8 or int4 when asked; a GGUF's blocks come as blocks) onto the mesh, then write
    the checkpoint from there."""
    if quantize == "int8":
        cfg = dataclasses.replace(cfg, quant="int8")
        pieces = quantize_pieces(pieces, cfg)
    elif quantize == "int4":
        cfg, pieces = int4_pieces(pieces, cfg)
    elif quantize and not (quantize == "gguf" and cfg.quant == "blocks"):
        raise ValueError(f"unknown quantization {quantize!r} (supported: {', '.join(QUANTIZE)})")
    params = place(pieces, cfg, mesh if mesh is not None else make_mesh(1, None))
    save_checkpoint(out_dir, cfg, params, tokenizer)


def convert(
    path: Path,
    out_dir: Path,
    max_context: int | None = None,
    progress: bool = True,
    quantize: str | None = None,
    mesh=None,
) -> Path:
    """A GGUF file or a Hugging Face checkpoint directory -> checkpoint folder (config, tokenizer, orbax
    params), int8 when `quantize` says so, the weights streamed through `mesh` (default: every device). A
    folder converted from a directory records its source (`source`), so another directory of the same name
    is converted anew. Returns the folder."""
    t0 = time.perf_counter()
    hf = is_hf_directory(Path(path))
    if hf and quantize == "gguf":
        raise ValueError("--quantize gguf serves a GGUF file's own blocks; a Hugging Face directory has none")
    opener = open_hf if hf else open_gguf_blocks if quantize == "gguf" else open_gguf
    _write(*opener(Path(path), max_context, progress), out_dir, quantize, mesh)
    if hf:
        (Path(out_dir) / SOURCE).write_text(str(Path(path).resolve()) + "\n")
    log.info("converted %s -> %s in %.1f s", path, out_dir, time.perf_counter() - t0)
    return Path(out_dir)


convert_gguf = convert_hf = convert  # the source itself says which it is


def checkpoint_name(name: str, quantize: str | None) -> str:
    return f"{name}-{quantize}" if quantize else name


def ensure_checkpoint(
    name: str, checkpoint_root: Path, progress: bool = True, quantize: str | None = None, mesh=None
) -> Path:
    """The checkpoint folder for `name` (a folder path, or a model name under checkpoint_root; `quantize`
    picks its int8 variant), converting a card's GGUF weights or a Hugging Face checkpoint directory
    (into checkpoint_root/DIRNAME, streamed through `mesh`) on first use."""
    if is_hf_directory(Path(name)) and not is_checkpoint(Path(name)):
        source = Path(name).resolve()
        directory = Path(checkpoint_root) / checkpoint_name(source.name, quantize)
        recorded = directory / SOURCE
        if is_checkpoint(directory) and recorded.is_file() and recorded.read_text().strip() == str(source):
            return directory
        log.info("first use of %s: converting it into %s", source, directory)
        return convert_hf(source, directory, progress=progress, quantize=quantize, mesh=mesh)
    if is_checkpoint(Path(name)) or is_stale_checkpoint(Path(name)):
        return Path(name)  # a folder named directly (a stale one fails to load with a clear message)
    directory = Path(checkpoint_root) / checkpoint_name(name, quantize)
    if is_checkpoint(directory):
        return directory
    card = find_card(name)
    if card is None:
        known = ", ".join(sorted(list_cards()))
        raise FileNotFoundError(f"no checkpoint {directory} and no model card {name!r} (cards: {known})")
    if card.weights["format"] == "gguf":
        if is_stale_checkpoint(directory):
            log.warning("%s was written by an older jaxserve: converting %s again", directory, name)
        else:
            log.info("first use of %s: converting its GGUF weights into %s", name, directory)
        return convert_gguf(
            gguf_path(card),
            directory,
            max_context=card.context_length,
            progress=progress,
            quantize=quantize,
            mesh=mesh,
        )
    raise FileNotFoundError(
        f"model {name!r} has no checkpoint at {directory}; "
        f"build it with `python {card.weights['script']} --out {directory}`"
    )


def source_chat_template(directory: Path) -> str | None:
    """The chat template of a checkpoint converted before templates were stored, read from its source again
    (the recorded Hugging Face directory, or the GGUF file of the card the folder is named after, its
    quantized variant's suffix aside); None when there is none."""
    directory = Path(directory)
    name = next(
        (directory.name.removesuffix(f"-{q}") for q in QUANTIZE if directory.name.endswith(f"-{q}")), directory.name
    )
    try:
        recorded = directory / SOURCE
        if recorded.is_file():
            return read_hf_chat_template(Path(recorded.read_text().strip()))
        card = find_card(name)
        if card is not None and card.weights.get("format") == "gguf":
            import gguf

            return read_chat_template(gguf.GGUFReader(str(gguf_path(card))))
    except (OSError, ValueError) as e:
        log.warning("could not read %s's chat template from its source: %s", name, e)
    return None


def load_model(
    name: str, checkpoint_root: Path, mesh, progress: bool = True, dtype: str | None = None, quantize: str | None = None
) -> LoadedModel:
    t0 = time.perf_counter()
    directory = ensure_checkpoint(name, checkpoint_root, progress, quantize, mesh)
    model = load_checkpoint(directory, mesh, name=Path(name).name, dtype=dtype)
    log.info(
        "loaded %s (%.1fM params) onto mesh %s in %.1f s",
        model.name,
        model.cfg.num_params() / 1e6,
        dict(model.mesh.shape),
        time.perf_counter() - t0,
    )
    return model
