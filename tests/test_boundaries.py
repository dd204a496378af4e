"""The layers' import boundaries: the HTTP layer and the engine's host half load no jax; the device half
loads jax and flax but not the checkpoint formats (orbax)."""

import json
import pkgutil
import subprocess
import sys

import jaxserve.engine


def loaded_jax(modules: str) -> list[str]:
    """Which of jax, flax and orbax a fresh interpreter has loaded after importing `modules`."""
    code = (
        f"import json, sys, {modules}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'orbax'})))"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_the_http_layer_loads_no_jax():
    assert loaded_jax("jaxserve.api.protocol, jaxserve.api.serving, jaxserve.api.app, jaxserve.batch") == []


def test_the_engines_host_half_loads_no_jax():
    modules = [f"jaxserve.engine.{m.name}" for m in pkgutil.iter_modules(jaxserve.engine.__path__)]
    assert {"jaxserve.engine.scheduler", "jaxserve.engine.kv", "jaxserve.engine.plan"} <= set(modules)
    assert loaded_jax(", ".join(modules)) == []


def test_the_device_half_loads_jax_but_no_checkpoint_format():  # so the checks above can fail
    assert loaded_jax("jaxserve.device.runner, jaxserve.device.warmup, jaxserve.device.build") == ["flax", "jax"]
