"""What serving one model from several processes costs, against one process on as many devices, same run:

    python scripts/bench_multihost.py [--setups data2 model3] [--concurrency 1 32] [--max-tokens 64]
                                      [--model smollm2-135m-instruct] [--quantize none] [--compile-cache DIR]

Each setup runs `jaxserve serve` twice with the same mesh: one process with K CPU devices, and K processes
of one device each joined over loopback (jax.distributed, process 0 serving HTTP). Both start once to fill
the executable store, then again, timed from launch to healthy with every shape ready (a warm store), and
are loaded with streaming requests at each concurrency (bench_serving's client). Setups:

    data2    --mesh data=2,model=1: the only cross-process traffic is the plan (what shipping plans costs)
    model3   --mesh data=1,model=3: the model axis across processes (the per-layer all-reduces ride gloo)

Prints, per setup and concurrency: tok/s, inter-token latency p50 (a decode step at 1 stream), and the
group's figures as a ratio of the single process's; and each start's seconds to healthy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from bench_serving import free_port, run_level, wait_healthy

SETUPS = {"data2": ("data=2,model=1", 2), "model3": ("data=1,model=3", 3)}


def start(args, mesh: str, devices: int, processes: int) -> tuple[list[subprocess.Popen], str]:
    """`processes` processes of devices // processes CPU devices each, serving on one port."""
    port, coordinator = free_port(), free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices // processes}")
    flags = ["--model", args.model, "--mesh", mesh, "--max-slots", str(max(args.concurrency))]
    flags += ["--max-context", "256", "--quantize", args.quantize, "--formulation", "f32"]
    flags += ["--compile-cache", args.compile_cache, "--port", str(port)]
    if args.checkpoints:
        flags += ["--checkpoints", args.checkpoints]
    if processes > 1:
        flags += ["--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", str(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxserve.cli", "--log-level", "WARNING", "serve", *flags]
            + (["--process-id", str(i)] if processes > 1 else []),
            env=env,
        )
        for i in range(processes)
    ]
    return procs, f"http://127.0.0.1:{port}"


def stop(procs: list[subprocess.Popen]) -> None:
    procs[0].terminate()  # the leader stops the others
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def measure(args, mesh: str, devices: int, processes: int) -> tuple[float, list[dict]]:
    procs, url = start(args, mesh, devices, processes)  # fills the store
    wait_healthy(procs[0], url)
    stop(procs)
    t0 = time.perf_counter()
    procs, url = start(args, mesh, devices, processes)
    wait_healthy(procs[0], url)
    healthy = time.perf_counter() - t0
    try:
        levels = [
            asyncio.run(run_level(url, args.model, c, args.requests_per_client, args.max_tokens, args.time_limit))
            for c in args.concurrency
        ]
    finally:
        stop(procs)
    return healthy, levels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=600)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantize", default="none")
    p.add_argument("--checkpoints")
    p.add_argument("--compile-cache", default="/tmp/jaxserve-bench-multihost")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; model {args.model} ({args.quantize}), f32 matmuls")
    for name in args.setups:
        mesh, k = SETUPS[name]
        alone_s, alone = measure(args, mesh, k, 1)
        group_s, group = measure(args, mesh, k, k)
        print(f"\n{name}: --mesh {mesh}; 1 process x {k} devices vs {k} processes x 1 device")
        print(f"  healthy (warm store): {alone_s:.1f} s vs {group_s:.1f} s = {group_s / alone_s:.2f}x")
        for a, g in zip(alone, group):
            print(
                f"  {a['concurrency']:>3} streams: {a['tok_s']:8.1f} vs {g['tok_s']:8.1f} tok/s = "
                f"{g['tok_s'] / a['tok_s']:.2f}x | step (ITL p50) {1e3 * a['itl_p50']:.2f} vs "
                f"{1e3 * g['itl_p50']:.2f} ms = +{1e3 * (g['itl_p50'] - a['itl_p50']):.2f} ms"
            )


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
