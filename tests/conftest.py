"""Shared fixtures. Forces 8 virtual CPU devices in this process (before jax starts its backend) so mesh tests
can run anywhere; the processes the tests start (servers, the CLI) get the environment as it was, one CPU
device as a user's server has (SmolLM2 sharded 8 ways over 2 cores makes every step 8-way collectives).

Models are built once per machine and reused: the tiny model is trained by scripts/train_tiny.py and
SmolLM2 converted from its GGUF into the checkpoint root ($JAXSERVE_CHECKPOINTS or ./checkpoints).
"""

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

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "tests" / "reference" / "smollm2_reference.json"


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
