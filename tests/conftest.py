"""Shared fixtures. Forces 8 virtual CPU devices in this process (before jax starts its backend) so mesh tests
can run anywhere; the processes the tests start (servers, the CLI) get the environment as it was, one CPU
device as a user's server has (SmolLM2 sharded 8 ways over 2 cores makes every step 8-way collectives).

Models are built once per machine and reused: the tiny model is trained by scripts/train_tiny.py and
SmolLM2 converted from its GGUF into the checkpoint root ($JAXSERVE_CHECKPOINTS or ./checkpoints).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_xla_flags = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
import jax  # noqa: E402

jax.devices()  # the backend reads the flag now, once
if _xla_flags is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _xla_flags

from jaxserve import host, kernels  # noqa: E402 (after the backend has its devices)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "reference" / "smollm2_reference.json"

# What tests measured or which code they ran, printed after the run (section -> what -> what came of it):
# reported, never asserted (a timing is no test's verdict).
SUMMARY: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="session")
def summary() -> dict[str, dict[str, str]]:
    return SUMMARY


@pytest.fixture(scope="session")
def bandwidth_summary(summary) -> dict[str, str]:
    """The summary's section of 1-row kernel bandwidths against the plain read (the kernel tests')."""
    return summary.setdefault("1-row kernel against a plain read of the same bytes (scripts/bench_bandwidth.py)", {})


@pytest.fixture(scope="session")
def bench_bandwidth():
    """scripts/bench_bandwidth.py as a module: its kernel-against-read measurement, run by the kernel tests."""
    spec = importlib.util.spec_from_file_location("bench_bandwidth", REPO / "scripts" / "bench_bandwidth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Paths CPUs have that no kernel is written for (jaxserve.kernels says so), with the CPU flags they need and
# why not. Every CPU with AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4) has AVX512-VNNI too: its int16
# products (two u8 x s8 dot products, 32 multiply-adds an instruction, as many as vdpbf16ps) round a run's
# largest values 2^7 times more finely than bfloat16 does: a bfloat16 path would be no faster and less exact.
UNWRITTEN = {
    "avx512_bf16": (frozenset({"avx512_bf16"}), "on this CPU, but not written: AVX512-VNNI's int16 products serve"),
}


def _why_not(name: str) -> str | None:
    """Why the kernels of path `name` cannot run here, or None where they can (built and registered)."""
    if name in UNWRITTEN and UNWRITTEN[name][0] <= host.cpu_flags():
        return UNWRITTEN[name][1]
    if name not in {i.name for i in kernels.runnable()}:
        return "not on this CPU"
    return None if kernels.available(name) else "no C++ compiler or no CPU backend here"


def _kernel_path(name: str, summary) -> str:
    """`name`, recorded in the summary as run; or the test skipped, saying why by name ("amx: not on this
    CPU")."""
    why = _why_not(name)
    summary.setdefault("kernel paths (jaxserve.kernels.ISAS)", {})[name] = "ran" if why is None else f"skipped, {why}"
    if why is not None:
        pytest.skip(f"{name}: {why}")
    return name


@pytest.fixture(params=[*(i.name for i in kernels.ISAS if not i.emulated), *UNWRITTEN])
def isa(request, summary) -> str:
    """Each kernel path in turn (jaxserve.kernels.ISAS, then those not written yet), skipped by name where
    this CPU cannot run it; the summary lists which ran. An emulated path's other code is its CPU's own
    path: it runs in `q8_isa` alone."""
    return _kernel_path(request.param, summary)


@pytest.fixture(params=[*(i.name for i in kernels.ISAS if i.q8), *UNWRITTEN])
def q8_isa(request, summary) -> str:
    """As `isa`, over the paths that multiply on quantized activations, the emulated ones too."""
    return _kernel_path(request.param, summary)


def pytest_terminal_summary(terminalreporter):
    for section, entries in SUMMARY.items():
        terminalreporter.section(section)
        for what, line in entries.items():
            terminalreporter.write_line(f"{what}: {line}")


@pytest.fixture(scope="session")
def checkpoint_root() -> Path:
    root = Path(os.environ.get("JAXSERVE_CHECKPOINTS", REPO / "checkpoints"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def tiny_dir(checkpoint_root) -> Path:
    from jaxserve.checkpoint.store import is_checkpoint

    directory = checkpoint_root / "tiny-llama"
    if not is_checkpoint(directory):
        subprocess.run([sys.executable, str(REPO / "scripts" / "train_tiny.py"), "--out", str(directory)], check=True)
    return directory


@pytest.fixture(scope="session")
def mesh1():
    from jaxserve.sharding import make_mesh

    return make_mesh(1, 1)


@pytest.fixture(scope="session")
def tiny(tiny_dir, mesh1):
    from jaxserve.checkpoint import load_checkpoint

    return load_checkpoint(tiny_dir, mesh1)


@pytest.fixture(scope="session")
def smollm2_dir(checkpoint_root) -> Path:
    from jaxserve.checkpoint import DEFAULT_MODEL, ensure_checkpoint

    return ensure_checkpoint(DEFAULT_MODEL, checkpoint_root, progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir, mesh1):
    from jaxserve.checkpoint import load_checkpoint

    return load_checkpoint(smollm2_dir, mesh1)


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())
