"""The host CPU as /proc/cpuinfo tells it: what the caches of compiled code (XLA executables, the int8
kernel, the formulation's choice) are keyed by, so a folder shared with another kind of machine never
hands over code or choices made for that machine."""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them ("avx2", "avx512f", "avx512_vnni", ...)."""
    fields = _cpuinfo()
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def cpu_features() -> str:
    """A hash of the CPU's feature flags: compilers emit code for the features they find."""
    fields = _cpuinfo()
    features = fields.get("flags") or fields.get("Features") or platform.machine()
    return hashlib.sha256(features.encode()).hexdigest()[:16]
