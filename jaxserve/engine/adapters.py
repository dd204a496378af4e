"""The LoRA adapters an engine serves, on the host: which name holds which entry of the device's adapter
stack, and which requests use each. No jax here.

An adapter's entry i (1 ..max_loras) is the index its requests' rows carry on the device (0 = the base).
Each adapter also gets a `uid` never reused, the root of its prefix-cache keys, so a page computed under
one adapter never serves another, nor the same name loaded again from other files.

Requests hold their adapter from submission until they end (`acquire` / `release`, counted per adapter),
so an adapter with requests in flight or waiting is never unloaded: `remove` refuses it (AdapterBusy,
the API's 409) rather than waiting for them. A full table refuses a load (AdapterTableFull, also 409).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from typing import Any

from jaxserve.engine.types import RequestError

log = logging.getLogger(__name__)


class AdapterBusy(RequestError):
    code = "adapter_in_use"


class AdapterTableFull(RequestError):
    code = "adapter_table_full"


class ModelNotFound(RequestError):
    code = "model_not_found"


class AdapterNotFound(RequestError):
    code = "adapter_not_found"


@dataclasses.dataclass
class AdapterEntry:
    name: str
    path: str
    index: int  # its entry of the device stack + 1 (0 is the base)
    uid: int  # never reused: its prefix-cache root
    refs: int = 0  # requests submitted and not ended

    @property
    def cache_root(self) -> int:
        """The key root of its prefix-cache pages; the base's pages hang off -1."""
        return -2 - self.uid


class AdapterTable:
    def __init__(self, slots: int):
        self.slots = slots  # --max-loras
        self._lock = threading.Lock()
        self._by_name: dict[str, AdapterEntry] = {}
        self._reserved: set[int] = set()  # indices being loaded, not yet named
        self._uids = itertools.count()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._by_name)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._by_name.values())

    def reserve(self, name: str) -> int:
        """A free index for `name`, held until `publish` or `free`. Raises AdapterTableFull, or RequestError if
        the name is taken."""
        with self._lock:
            if name in self._by_name:
                raise RequestError(f"a LoRA adapter named {name!r} is already loaded", "lora_name")
            used = {e.index for e in self._by_name.values()} | self._reserved
            free = [i for i in range(1, self.slots + 1) if i not in used]
            if not free:
                raise AdapterTableFull(
                    f"{self.slots} LoRA adapters are loaded already (--max-loras): unload one first", "lora_name"
                )
            self._reserved.add(free[0])
            return free[0]

    def load(self, name: str, path: str, runner: Any) -> AdapterEntry:
        """Read the adapter in directory `path` (here, in the caller's thread), write it into a free entry of
        `runner`'s stack (a contract.Runner) and serve it as `name`. RequestError naming what is wrong;
        AdapterTableFull when --max-loras are loaded."""
        if self.slots == 0:
            raise RequestError("this server serves no LoRA adapters (--max-loras 0)", "lora_name")
        index = self.reserve(name)
        try:
            runner.load_adapter(index, runner.read_adapter(name, path))
        except BaseException:
            self.free(index)
            raise
        log.info("LoRA adapter %s loaded from %s as adapter %d", name, path, index)
        return self.publish(name, path, index)

    def publish(self, name: str, path: str, index: int) -> AdapterEntry:
        """The adapter loaded into `index` is served from now on under `name`."""
        with self._lock:
            self._reserved.discard(index)
            entry = self._by_name[name] = AdapterEntry(name, path, index, next(self._uids))
            return entry

    def free(self, index: int) -> None:
        """A reserved index whose load failed."""
        with self._lock:
            self._reserved.discard(index)

    def acquire(self, name: str) -> AdapterEntry:
        """The adapter `name` for a request being submitted (counted until `release`); RequestError if none."""
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None:
                raise ModelNotFound(f"The model '{name}' does not exist", "model")
            entry.refs += 1
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.refs -= 1

    def remove(self, name: str) -> AdapterEntry:
        """Stop serving `name`; its index is free for another, and its prefix-cache pages are never hit again
        (their keys hang off its uid: they age out of the cache). Refuses one that requests still use."""
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None:
                raise AdapterNotFound(f"no LoRA adapter named {name!r} is loaded", "lora_name")
            if entry.refs:
                raise AdapterBusy(
                    f"the LoRA adapter {name!r} has {entry.refs} request(s) in flight or waiting; retry when they end",
                    "lora_name",
                )
            del self._by_name[name]
        log.info("LoRA adapter %s unloaded", name)
        return entry
