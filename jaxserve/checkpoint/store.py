"""Checkpoint folders: `config.json` + tokenizer files + `params/` (orbax), restored onto a mesh.

Restoring asks orbax for each array with its target NamedSharding, so every device reads only its own
shards straight from disk; the weights never pass through one host copy first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxserve.model import LoadedModel, ModelConfig, abstract_params
from jaxserve.sharding import tree_shardings
from jaxserve.tokenizer import CHAT_TEMPLATE, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

CONFIG = "config.json"
PARAMS = "params"
FORMAT = "format"  # holds FORMAT_VERSION: a checkpoint of another layout is converted again, never misread
FORMAT_VERSION = "2"  # 2: int8 scales per group of 64 inputs; gate and up projections stored as one gate_up


def is_checkpoint(directory: Path) -> bool:
    """A complete checkpoint folder in this version's format."""
    return (
        (Path(directory) / CONFIG).is_file()
        and (Path(directory) / PARAMS).is_dir()
        and _format(directory) == FORMAT_VERSION
    )


def is_stale_checkpoint(directory: Path) -> bool:
    """A checkpoint folder written by an older jaxserve, in another parameter layout."""
    return (Path(directory) / CONFIG).is_file() and _format(directory) != FORMAT_VERSION


def _format(directory: Path) -> str | None:
    path = Path(directory) / FORMAT
    return path.read_text().strip() if path.is_file() else None


def save_checkpoint(directory: Path, cfg: ModelConfig, params, tokenizer: Tokenizer) -> None:
    """Write a checkpoint folder, replacing any previous one; the folder appears only when complete.
    `params` may be NumPy or already on a mesh (as conversion leaves them): each leaf is cast to the dtype
    the model declares where it is, and orbax moves at most about two leaves at a time to the host."""
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG).write_text(cfg.to_json())
    (tmp / FORMAT).write_text(FORMAT_VERSION + "\n")
    tokenizer.save(tmp)
    shapes, _ = abstract_params(cfg)  # each leaf in the dtype the model declares (int8 kernels stay int8)
    params = jax.tree.map(lambda x, s: x if x.dtype == s.dtype else x.astype(s.dtype), params, shapes)
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    handler = ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=(2 * largest + 1) / 1e9)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp / PARAMS, args=ocp.args.PyTreeSave(params))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_checkpoint(directory: Path, mesh, name: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Restore a checkpoint onto `mesh`; `dtype` (e.g. "bfloat16") converts the weights as they load."""
    directory = Path(directory).absolute()
    if is_stale_checkpoint(directory):
        raise ValueError(
            f"{directory} was written by an older jaxserve (checkpoint format {_format(directory)}, "
            f"this version reads {FORMAT_VERSION}); delete it and convert the model again"
        )
    cfg = ModelConfig.load(directory / CONFIG)
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    shapes, axes = abstract_params(cfg)
    shardings = tree_shardings(axes, shapes, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / PARAMS, target)
    tokenizer = load_tokenizer(directory)
    if tokenizer.chat_template is None:  # converted before chat templates were stored: read from the source
        from jaxserve.checkpoint import source_chat_template

        tokenizer.chat_template = source_chat_template(directory)
        if tokenizer.chat_template is not None:  # and kept beside the tokenizer, as a conversion now does
            _keep_chat_template(directory, tokenizer.chat_template)
    return LoadedModel(name or directory.name, cfg, params, shardings, tokenizer, mesh)


def _keep_chat_template(directory: Path, template: str) -> None:
    """Write the template into the checkpoint folder, so the next load does not read the source (a GGUF
    file's whole header: seconds); a folder that cannot be written reads the source each time."""
    tmp = directory / f"{CHAT_TEMPLATE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(template)
        os.replace(tmp, directory / CHAT_TEMPLATE)  # a concurrent load reads a whole file or none
    except OSError as e:
        log.info("chat template not kept in %s (%s): read from the source at each load", directory, e)
        tmp.unlink(missing_ok=True)
