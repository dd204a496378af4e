"""CPU kernels of our own, called from jitted code through the XLA FFI: the int8 weight matmul
(int8_matmul.cc, which says why XLA:CPU needs it), the GGUF block-format matmuls (block_matmul.cc) and
paged attention over the KV pool in place (attention.cc).

The C++ sources ship with the package and are compiled on first use on the machine that runs it (g++ -O3, a
few seconds), once per instruction-set path (`ISAS`): each path built with its own explicit flags, the
sources choosing their code by what those flags define (AVX2 and F16C, AVX-512, AVX512-VNNI) with portable
vector code beneath. The CPU's flags pick the path that serves (`best()`); any other path it can run is built only when
asked for by name (the tests run every one against NumPy). Each library goes into a folder keyed by everything
it depends on (sources, compiler, flags, jax version, CPU flags), so a restart loads it and a machine of
another kind never does. Where no compiler or no CPU backend is at hand, `available()` says so and the model
computes with XLA alone.

AMX (Intel Sapphire Rapids on): the block kernels on quantized activations take 16 rows of x at a time on
its tiles, to the bits AVX512-VNNI gives them (tiles.h). No CPU we measure on has AMX: its path is tested
where a CPU has it, and everywhere with AVX512-VNNI through an emulation of the tile instructions
("avx512_amx_emulated", built for the tests, never the path that serves). Not written: AVX512-BF16, whose
bfloat16 dot products are no faster than the int16 ones AVX512-VNNI gives (present on every CPU with
AVX512-BF16) and round more coarsely.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import host

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("int8_matmul.cc", "block_matmul.cc", "attention.cc"))
HEADERS = tuple(Path(__file__).with_name(n) for n in ("pool.h", "tiles.h", "vec.h"))
TARGETS = {"kn": "jaxserve_int8_matmul", "nk": "jaxserve_int8_matmul_nk"}
BLOCK_TARGETS = {f: f"jaxserve_{f}_matmul" for f in ("q4_0", "q4_1", "q8_0")}
ATTENTION = "jaxserve_cpu_attention"
KV_WRITE = "jaxserve_kv_write"
READ = "jaxserve_read_bytes"  # a plain read of a weight's bytes: the floor the kernels are measured against
LANES = 16  # the kernel's vector width in floats: output columns and groups are multiples of it
COMPILER = os.environ.get("CXX", "g++")


@dataclasses.dataclass(frozen=True)
class Isa:
    """One build of the kernels: the compiler flags it is built with, the CPU flags (as /proc/cpuinfo names
    them) it needs to run, whether it multiplies on quantized activations (`block_matmul`'s q8), and
    whether it is a test build that never serves (`emulated`)."""

    name: str
    flags: tuple[str, ...]
    needs: frozenset[str]
    q8: bool = False
    emulated: bool = False


_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
_AVX512_NEEDS = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
_VNNI, _VNNI_NEEDS = (*_AVX512, "-mavx512vnni"), _AVX512_NEEDS | {"avx512_vnni"}
# From the plainest to the fastest: the portable build is the compiler's default target (vector code that
# the compiler lowers to whatever that target has), the others add what their flags name.
ISAS = (
    Isa("portable", (), frozenset()),
    Isa("avx2", _AVX2, frozenset({"avx2", "fma", "f16c"})),
    Isa("avx512", _AVX512, _AVX512_NEEDS),
    Isa("avx512_vnni", _VNNI, _VNNI_NEEDS, q8=True),
    Isa("avx512_amx_emulated", (*_VNNI, "-DJAXSERVE_AMX_EMULATE"), _VNNI_NEEDS, q8=True, emulated=True),
    Isa("avx512_amx", (*_VNNI, "-mamx-tile", "-mamx-int8"), _VNNI_NEEDS | {"amx_tile", "amx_int8"}, q8=True),
)


def runnable() -> tuple[Isa, ...]:
    """The paths this CPU can run, plainest first."""
    return tuple(isa for isa in ISAS if isa.needs <= host.cpu_flags())


@functools.cache
def best() -> Isa:
    """The path that serves here: the fastest this CPU runs whose flags the compiler here takes (a g++ older
    than 11 has no AMX flags: there the next path serves, not XLA alone)."""
    paths = [isa for isa in runnable() if not isa.emulated]
    return next((isa for isa in reversed(paths) if _compiler_takes(isa.flags)), paths[0])


def _compiler_takes(flags: tuple[str, ...]) -> bool:
    try:
        return subprocess.run([COMPILER, *flags, "-E", "-x", "c++", os.devnull], capture_output=True).returncode == 0
    except OSError:  # no compiler: `available` says so
        return False


def _isa(name: str | None) -> Isa:
    """The path named `name`, or `best()` for None."""
    return best() if name is None else {i.name: i for i in ISAS}[name]


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSERVE_KERNEL_CACHE", Path.home() / ".cache" / "jaxserve" / "kernels"))


def version() -> str:
    """A short hash of the kernels' sources: what they compute and how fast (keys the formulation's cache)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:12]


def _build(isa: Isa) -> Path:
    """The library of path `isa` for this machine, built once into the cache."""
    compiler = subprocess.run([COMPILER, "--version"], capture_output=True, text=True, check=True).stdout
    key = "\n".join([version(), compiler, *isa.flags, jax.__version__, host.cpu_features()])
    lib = cache_dir() / f"kernels-{isa.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [COMPILER, "-O3", *isa.flags, "-std=c++17", "-shared", "-fPIC", "-w"]
        cmd += ["-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(tmp)]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        os.replace(tmp, lib)  # concurrent builders: each writes its own file, the last rename wins whole
        log.info("compiled %s for %s into %s", ", ".join(p.name for p in SOURCES), isa.name, lib)
    return lib


def target(name: str, isa: str | None) -> str:
    """The FFI target `name` of the library of path `isa` (None: `best()`), as registered."""
    return f"{name}_{_isa(isa).name}"


def available(isa: str | None = None) -> bool:
    """Whether the kernels of path `isa` (None: `best()`, the one that serves) are compiled and registered
    with XLA:CPU (once per process and path). Only a path in `runnable()` may be asked for."""
    return _register(_isa(isa)) is not None


@functools.cache
def _register(chosen: Isa) -> ctypes.CDLL | None:
    """The library of path `chosen`, its targets registered; None where it cannot be."""
    if jax.default_backend() != "cpu" or shutil.which(COMPILER) is None:
        return None
    assert chosen in runnable(), f"{chosen.name}: not on this CPU"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(chosen)))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("kernels unavailable (%s); quantized matmuls use XLA's formulations", e)
        return None
    for name in (*TARGETS.values(), *BLOCK_TARGETS.values(), ATTENTION, KV_WRITE, READ):
        jax.ffi.register_ffi_target(target(name, chosen.name), jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


def tiles(isa: str | None = None) -> bool:
    """Whether path `isa` (None: `best()`) multiplies 16 rows of quantized activations at a time on AMX tiles
    (or their emulation) here: built with them and, on the hardware, lent their state by Linux."""
    lib = _register(_isa(isa))
    return lib is not None and bool(lib.jaxserve_tiles())


def vnni() -> bool:
    """Whether the block kernels that serve can multiply on quantized activations here (AVX512-VNNI)."""
    return available() and best().q8


def fits(kernel_shape, scale_shape, contracted: int) -> bool:
    """Whether the kernel takes an int8 weight whose first `contracted` axes are its inputs."""
    k, n = math.prod(kernel_shape[:contracted]), math.prod(kernel_shape[contracted:])
    groups = math.prod(scale_shape[:contracted])
    return n % LANES == 0 and k % groups == 0 and (k // groups) % LANES == 0


def tile(n: int) -> int:
    """Output columns in a tile of a packed weight with `n` of them (as the kernel's tile_width)."""
    return 64 if n % 64 == 0 else LANES


def pack(a, contracted: int):
    """A weight (or its scales) whose first `contracted` axes are inputs, in the layout the [K, N] kernel
    reads: tiles of `tile(N)` output columns one after another, each [inputs, tile] row-major. Same shape
    and elements, other order."""
    k, n = math.prod(a.shape[:contracted]), math.prod(a.shape[contracted:])
    return a.reshape(k, n // tile(n), tile(n)).transpose(1, 0, 2).reshape(a.shape)


def unpack(a, contracted: int):
    """The inverse of `pack` (traced inside a step, XLA fuses it into the dequantization that reads it)."""
    k, n = math.prod(a.shape[:contracted]), math.prod(a.shape[contracted:])
    return a.reshape(n // tile(n), k, tile(n)).transpose(1, 0, 2).reshape(a.shape)


def int8_matmul(x, kernel, scale, contracted: int = 1, layer=0, layout: str = "kn", isa: str | None = None):
    """x [M, K] . layer `layer` (an int32 scalar, traced or not) of int8 kernels with group scales stacked
    over the layers -> [M, N] float32. layout "kn": kernel [L, K..., N...] and scale [L, K/G..., N...]
    packed (see `pack`), the first `contracted` axes after the layers' the inputs; "nk": kernel [L, N, K],
    scale [L, N, K/G], plain. The layer is read in place. `isa`: the path computing it (None: `best()`);
    call `available(isa)` first."""
    L = kernel.shape[0]
    if layout == "kn":
        k, n = math.prod(kernel.shape[1 : 1 + contracted]), math.prod(kernel.shape[1 + contracted :])
        kernel, scale = kernel.reshape(L, k, n), scale.reshape(L, -1, n)
    else:
        n = kernel.shape[1]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    call = jax.ffi.ffi_call(target(TARGETS[layout], isa), out)
    return call(x.astype(jnp.float32), kernel, scale, jnp.int32(layer))


def block_matmul(
    x,
    fmt: str,
    codes,
    d,
    m=None,
    layer=0,
    x_bits: int = 32,
    invariant: bool = False,
    tiles: bool = False,
    isa: str | None = None,
):
    """x [M, K] . layer `layer` (an int32 scalar, traced or not) of a weight [L, N, K] in GGUF block format
    `fmt` ("q4_0", "q4_1", "q8_0"), transposed -> [M, N] float32: codes [L, N, K/32 * block bytes], d (and,
    for q4_1, m) [L, N, K/32] float16, as jaxserve.model.blocks holds them. `x_bits` 8 or 16: x quantized
    to that many bits a run of 16 inputs first and multiplied with integer dot products (on a path whose
    `q8` is true), on a weight as jaxserve.model.blocks.interleave lays it out; 32: float32 x. `invariant`:
    one row of x gets the outputs it gets among other rows, bit for bit (AVX-512's float path otherwise
    takes one row through a loop of its own, the same within float rounding). `tiles`: on quantized
    activations, 16 rows at a time on AMX tiles, to the same bits (where `tiles(isa)`). `isa`: the path
    computing it (None: `best()`); call `available(isa)` first."""
    out = jax.ShapeDtypeStruct((x.shape[0], codes.shape[1]), jnp.float32)
    operands = (d,) if m is None else (d, m)
    call = jax.ffi.ffi_call(target(BLOCK_TARGETS[fmt], isa), out)
    flags = {"x_bits": np.int32(x_bits), "invariant": np.int32(invariant), "tiles": np.int32(tiles)}
    return call(x.astype(jnp.float32), codes, *operands, jnp.int32(layer), **flags)


def attention(q, k, v, layer, table, positions, local, scale: float, sliding_window: int = 0, isa: str | None = None):
    """Paged attention over layer `layer` (an int32 scalar, traced or not) of a KVCache pool read in place:
    q [B, T, N, H] of tokens at `positions` [B, T] over the pages of each row's `table` [B, C] in k
    [L, P, K, H, S] and v [L, P, K, S, H] (float32, or bfloat16 as uint16 bits), keys at positions <= their
    own and, where `local` (a bool scalar, traced or not) and `sliding_window` > 0, within the last
    `sliding_window` positions -> [B, T, N, H] float32 (0 for a query that sees no key). Head dim and page
    size multiples of LANES. `isa`: the path computing it (None: `best()`); call `available(isa)` first."""
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    index = lambda x: jnp.asarray(x, jnp.int32)
    call = jax.ffi.ffi_call(target(ATTENTION, isa), out)
    operands = (q.astype(jnp.float32), k, v, index(layer), index(table), index(positions), index(local))
    return call(*operands, scale=np.float32(scale), window=np.int32(sliding_window))


def kv_write(k_pool, v_pool, layer, page, offset, k, v, isa: str | None = None):
    """The pools k [L, P, K, H, S] and v [L, P, K, S, H] with k, v [B, T, K, H] (in the pools' dtype) written
    into layer `layer` at (page, offset) [B, T] (kv_cache.write_targets: a page outside the pool drops the
    write), in place: the results are the operands' buffers. `isa`: the path computing it (None: `best()`);
    call `available(isa)` first."""
    index = lambda x: jnp.asarray(x, jnp.int32)
    shapes = (jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype), jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype))
    call = jax.ffi.ffi_call(target(KV_WRITE, isa), shapes, input_output_aliases={0: 0, 1: 1})
    return call(k_pool, v_pool, index(layer), index(page), index(offset), k, v)


def read_bytes(parts, layer=0, isa: str | None = None):
    """Reads layer `layer` of every stack [L, ...] in `parts` (a weight's arrays) whole, their bytes 64 at a
    time on the kernels' threads, in one call -> a float32 [1] depending on every byte: the plain read a
    kernel's bandwidth is measured against."""
    call = jax.ffi.ffi_call(target(READ, isa), jax.ShapeDtypeStruct((1,), jnp.float32))
    return call(jnp.int32(layer), *parts)
