"""Compiled steps: lowered and compiled in parallel, kept on disk, and loaded on a restart without tracing.

A `Variant` is one jitted step of `steps.py` at one set of static arguments and one signature of abstract
arguments (shapes, dtypes, shardings). `compile_all` turns variants into `jax.stages.Compiled` executables
of those very jitted functions: each one is loaded from the `ExecutableStore` if a valid entry is there,
else lowered (tracing: Python, holding the GIL, one at a time) and compiled in a pool of threads (XLA
releases the GIL while it compiles, and consults jax's persistent compilation cache first), then saved.

Only an executable XLA compiled in this process is saved, never one jax's persistent cache handed over:
XLA:CPU serializes a deserialized executable without its kernels' object code, and the copy fails when it
runs ("NOT_FOUND: Function add_select_fusion not found"). Such a copy is also refused by its content: on
CPU an entry must carry object code, checked before saving and again before loading.

An entry's key is a hash of everything that decides the executable: jax and jaxlib versions, backend,
platform version and the devices (kind, id; on CPU the host CPU's model and features), the XLA flags and
the jax options that change programs, the source of the jaxserve modules that can change a program (all
but the host-side ones in HOST_ONLY), the step's name, its `StepSpec` (model config with the matmul
formulation, end ids, state shardings) and static arguments, and the tree, shapes, dtypes and shardings
of its arguments. The entry holds that key's text too, and begins with a sha256 of the rest, checked before
anything is unpickled or handed to XLA's deserializer (which damaged bytes can crash, taking the server
down at every start). A load whose checksum or key text differs, whose file is unreadable or incomplete, or
whose executable does not deserialize is logged, its file removed, and compiled afresh, so a stale or
damaged entry is never used.
Custom call targets (XLA FFI) are looked up by name when an executable loads and runs, so a target
registered before warm-up serves a loaded executable as it serves a compiled one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax.experimental import serialize_executable

from jaxserve import host

log = logging.getLogger(__name__)

FOLDER = "jaxserve-executables"  # inside the compilation cache's folder
# package files that never reach a traced program: editing them keeps the stored executables
HOST_ONLY = (
    "api/",
    "checkpoint/",
    "batch.py",
    "batch_shards.py",
    "chat_template.py",
    "cli.py",
    "engine_args.py",
    "host.py",
    "tokenizer.py",
    "engine/",  # the host half: no jax
    "multihost/",  # its one program, the broadcast of a plan's bytes, is not stored
    "device/build.py",
    "device/roofline.py",
    "device/warmup.py",
)
CACHE_HIT = "/jax/compilation_cache/cache_hits"  # the jax.monitoring event of a persistent-cache hit
ENTRY = b"jaxserve-executable 1\n"  # an entry: this, the sha256 digest of the payload, the payload (a pickle)
OBJECT_CODE = (b"\x7fELF", b"\xcf\xfa\xed\xfe")  # ELF and Mach-O magic: what an XLA:CPU kernel is stored as
# jax options that change the programs a trace produces
OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable", "jax_default_prng_impl")


@dataclasses.dataclass(frozen=True, eq=False)
class Variant:
    """`fn(spec, *args, **statics)` for jitted step `fn`, `args` abstract (jax.ShapeDtypeStruct leaves)."""

    fn: Any
    statics: tuple[tuple[str, Any], ...]
    args: tuple


def abstract(x) -> jax.ShapeDtypeStruct:
    """The abstract value of an argument leaf: a device array keeps its sharding; a host value has none (jit
    places it as it would at a call)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


@functools.cache
def _source_hash() -> str:
    """sha256 of the jaxserve package's Python files, but for the HOST_ONLY ones (a new file counts)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if not name.startswith(HOST_ONLY):
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


_compiling = threading.local()  # .hit: jax's persistent cache answered this thread's compile


def _note_cache_hit(event: str, **_) -> None:
    if event == CACHE_HIT:
        _compiling.hit = True


@functools.cache
def _listen_for_cache_hits() -> None:
    jax.monitoring.register_event_listener(_note_cache_hit)


def compile_fresh(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """`lowered` compiled, and whether XLA compiled it here (False: jax's persistent cache handed it over,
    and on CPU it would not survive another serialization). jax records the event in the compiling thread."""
    _listen_for_cache_hits()
    _compiling.hit = False
    compiled = lowered.compile()
    return compiled, not _compiling.hit


def complete(blob: bytes, platform: str) -> bool:
    """Whether a serialized executable holds what it needs to run: on CPU, its kernels' object code."""
    return platform != "cpu" or any(magic in blob for magic in OBJECT_CODE)


def host_cpu() -> str:
    """The host CPU's model and a hash of its feature flags: XLA:CPU compiles for the features it finds, so a
    cache folder shared with another kind of machine must not hand over code that machine cannot run."""
    return f"{host.cpu_model()} features {host.cpu_features()}"


@functools.cache
def environment() -> str:
    """What decides every executable beyond its program: versions, backend, devices (on CPU, the host CPU's
    model and features), flags, options, code."""
    backend = jax.devices()[0].client
    devices = ", ".join(f"{d.id}:{d.device_kind}" for d in jax.devices())
    local = [d.id for d in jax.local_devices()]  # in a group: each process keeps its own executables
    devices += f" | process {jax.process_index()} of {jax.process_count()}, its devices {local}"
    if backend.platform == "cpu":
        devices += f" on {host_cpu()}"
    options = ", ".join(f"{name}={getattr(jax.config, name)}" for name in OPTIONS)
    return (
        f"jax {jax.__version__} jaxlib {jaxlib.__version__} | {backend.platform} {backend.platform_version} | "
        f"devices {devices} | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')} | {options} | "
        f"jaxserve source {_source_hash()}"
    )


def key_text(spec, variant: Variant) -> str:
    """Everything that decides one variant's executable, as text."""
    leaves, tree = jax.tree.flatten(variant.args)
    shapes = "; ".join(f"{x.dtype}{list(x.shape)} {x.sharding}" for x in leaves)
    sharding = jax.tree.map(str, spec.state_sharding)
    mesh = spec.replicated.mesh
    return (
        f"{environment()}\n{variant.fn.__name__} {variant.statics}\nconfig {spec.cfg!r}\n{spec.formulation!r}\n"
        f"eos {spec.eos_ids}\n"
        f"mesh {dict(mesh.shape)} devices {mesh.device_ids.tolist()}\nstate {sharding} replicated {spec.replicated}\n"
        f"args {tree}\n{shapes}"
    )


class ExecutableStore:
    """Serialized executables in `folder`, one file per key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.exe"

    def load(self, key: str, devices: list) -> jax.stages.Compiled | None:
        """The executable stored under `key`, on `devices` (the mesh's, in its order), or None (an entry
        that is there but cannot be used is removed: the compile that follows saves a good one)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            stored_key, blob, in_tree, out_tree = unpack(path.read_bytes())
            if stored_key != key:
                log.warning("executable %s was stored for another key: compiling afresh", path.name)
            elif not complete(blob, devices[0].platform):
                log.warning("executable %s lacks its object code: compiling afresh", path.name)
            else:
                return serialize_executable.deserialize_and_load(blob, in_tree, out_tree, execution_devices=devices)
        except Exception as e:  # an unreadable or stale entry is compiled again, never used
            log.warning("executable %s failed to load (%s: %s): compiling afresh", path.name, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None

    def save(self, key: str, compiled: jax.stages.Compiled, platform: str) -> None:
        """Keep `compiled`, which XLA compiled in this process (see `compile_fresh`) for `platform`."""
        try:
            blob, in_tree, out_tree = serialize_executable.serialize(compiled)
            if not complete(blob, platform):
                log.warning("executable not saved: its serialization lacks the object code")
                return
            data = pack(key, blob, in_tree, out_tree)
        except Exception as e:
            log.warning("executable not saved (%s: %s)", type(e).__name__, e)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a concurrent reader sees a whole entry or none


class DamagedEntry(ValueError):
    """An entry's bytes are not the ones that were saved."""


def pack(key: str, blob: bytes, in_tree, out_tree) -> bytes:
    """An entry's bytes: the header, the sha256 digest of the payload, the payload."""
    payload = pickle.dumps((key, blob, in_tree, out_tree))
    return ENTRY + hashlib.sha256(payload).digest() + payload


def unpack(data: bytes) -> tuple:
    """(key, blob, in_tree, out_tree) of an entry whose checksum matches; else DamagedEntry, before anything
    is unpickled."""
    digest_end = len(ENTRY) + hashlib.sha256().digest_size
    if not data.startswith(ENTRY) or len(data) < digest_end:
        raise DamagedEntry("not a jaxserve executable entry")
    if hashlib.sha256(data[digest_end:]).digest() != data[len(ENTRY) : digest_end]:
        raise DamagedEntry("its checksum does not match its contents")
    return pickle.loads(data[digest_end:])


@dataclasses.dataclass
class Report:
    loaded: int = 0
    compiled: int = 0
    cache_hits: int = 0  # of the compiled, those jax's persistent cache handed over: not stored
    missing: list[Variant] = dataclasses.field(default_factory=list)  # neither loaded nor compiled: stopped
    seconds: float = 0.0


def compile_all(
    spec,
    variants: list[Variant],
    store: ExecutableStore | None,
    ready: Callable[[Variant, jax.stages.Compiled], None],
    threads: int | None = None,
    stop: threading.Event | None = None,
) -> Report:
    """Hand each variant's executable to `ready` as soon as it is there: loaded from `store` where a valid
    entry is (loads run in threads), else lowered here and compiled in `threads` threads
    (default: one per CPU; no more compiles in flight than threads), then saved to `store` if XLA compiled
    it here. Once `stop` is set, nothing more is lowered."""
    t0 = time.perf_counter()
    report = Report()
    threads = threads or os.cpu_count() or 1
    keys = {v: key_text(spec, v) for v in variants} if store is not None else {}
    devices = list(spec.replicated.mesh.devices.flat)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        loads = {v: pool.submit(store.load, keys[v], devices) for v in variants} if store is not None else {}
        compiling: dict[concurrent.futures.Future, Variant] = {}

        def finish(done) -> None:
            for future in done:
                v, (compiled, fresh) = compiling.pop(future), future.result()
                ready(v, compiled)
                report.compiled += 1
                report.cache_hits += not fresh
                if store is not None and fresh:
                    pool.submit(store.save, keys[v], compiled, devices[0].platform)

        for v in variants:
            compiled = loads[v].result() if v in loads else None
            if compiled is not None:
                ready(v, compiled)
                report.loaded += 1
                continue
            if stop is not None and stop.is_set():
                report.missing.append(v)
                continue
            if len(compiling) >= threads:
                finish(concurrent.futures.wait(compiling, return_when=concurrent.futures.FIRST_COMPLETED).done)
            lowered = v.fn.lower(spec, *v.args, **dict(v.statics))  # traces: holds the GIL
            compiling[pool.submit(compile_fresh, lowered)] = v
        finish(concurrent.futures.wait(compiling).done)
    report.seconds = time.perf_counter() - t0
    return report
