"""scripts/bench_serving.py's picture of its table, drawn from a made-up results structure (no server runs)."""

import importlib.util
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_serving.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows() -> list[dict]:
    """Two servers x three levels, as --json holds them; llama-server's 32-stream level failed (no row), and
    jaxserve's 8-stream level received nothing in one round (TTFT NaN, as run_level reports it)."""
    figures = {
        ("gguf", 1): (60.0, 0.05),
        ("gguf", 8): (300.0, math.nan),
        ("gguf", 32): (700.0, 0.4),
        ("llama-server", 1): (100.0, 0.03),
        ("llama-server", 8): (250.0, 0.1),
    }
    return [
        {"weights": w, "round": 1, "concurrency": c, "requests": 2 * c, "cut": 0, "tok_s": tok, "ttft_p50": ttft}
        for (w, c), (tok, ttft) in figures.items()
    ]


def test_the_table_is_drawn_as_an_svg_with_a_gap_where_a_level_failed(bench, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.svg"
    assert bench.plot_rows(rows(), path, "smollm2-135m-instruct", "Some CPU")
    root = ET.parse(path).getroot()  # well-formed XML whose root is an <svg>
    assert root.tag.endswith("svg")
    text = path.read_text()
    for words in ("smollm2-135m-instruct on Some CPU", "concurrency (streams)", "TTFT p50 (s)", "llama-server"):
        assert words in text  # the title, axis labels and legend are kept as text (svg.fonttype "none")


def test_the_table_is_drawn_as_a_png(bench, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert bench.plot_rows(rows(), path, "m", "cpu")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_picture_is_skipped_with_one_line(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it raises ImportError
    assert not bench.plot_rows(rows(), tmp_path / "bench.svg")
    out = capsys.readouterr().out
    assert not (tmp_path / "bench.svg").exists()
    assert out.count("\n") == 1 and "skipped" in out and ".[bench]" in out
