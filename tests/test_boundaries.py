"""The layers' import boundaries: the HTTP layer and the engine's host side load no jax."""

import json
import subprocess
import sys


def loaded_jax(modules: str) -> list[str]:
    """Which of jax, flax and orbax a fresh interpreter has loaded after importing `modules`."""
    code = (
        f"import json, sys, {modules}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'orbax'})))"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_the_http_layer_loads_no_jax():
    assert loaded_jax("jaxserve.api.protocol, jaxserve.api.serving, jaxserve.api.app, jaxserve.batch") == []


def test_the_scheduler_and_its_bridges_load_no_jax():
    assert loaded_jax("jaxserve.engine.scheduler, jaxserve.engine.bridge, jaxserve.engine.contract") == []


def test_the_device_side_does_load_jax():  # so the checks above can fail
    assert loaded_jax("jaxserve.engine.core") == ["flax", "jax", "orbax"]
