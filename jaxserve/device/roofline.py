"""The two floors of a decode step, for benchmarks: bytes moved (weights + KV read once) over measured
memory bandwidth, and FLOPs over measured matmul throughput. Whichever is larger bounds the step."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from jaxserve.model import KVCache, ModelConfig


def _best_time(f, x) -> float:
    """Fastest of 5 runs of a jitted f(x), after one to compile."""
    f(x).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times)


@dataclasses.dataclass(frozen=True)
class Machine:
    bandwidth: float  # bytes/s of a large on-device reduction
    flops: float  # float32 matmul FLOP/s

    @classmethod
    def measure(cls) -> Machine:
        x = jnp.ones((128 * 1024 * 1024,), jnp.float32)  # 512 MiB
        bandwidth = x.nbytes / _best_time(jax.jit(jnp.sum), x)
        del x
        a = jnp.ones((2048, 2048), jnp.float32)
        return cls(bandwidth, 2 * 2048**3 / _best_time(jax.jit(lambda a: a @ a), a))

    def __str__(self) -> str:
        return f"bandwidth {self.bandwidth / 1e9:.1f} GB/s, matmul {self.flops / 1e9:.0f} GFLOP/s"


def floors(cfg: ModelConfig, batch: int, context: int, machine: Machine) -> tuple[float, float]:
    """Seconds per decode step of `batch` sequences at `context` positions: (memory floor, compute floor)."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weight_bytes = cfg.num_params() * (1 if cfg.quant == "int8" else itemsize)
    kv_bytes = batch * context * KVCache.bytes_per_token(cfg)  # in the pool's dtype
    matmul_flops = 2 * batch * cfg.num_params()
    attn_flops = 4 * cfg.n_layers * batch * context * cfg.n_heads * cfg.head_dim
    return (weight_bytes + kv_bytes) / machine.bandwidth, (matmul_flops + attn_flops) / machine.flops
