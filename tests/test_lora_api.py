"""LoRA adapters through the HTTP API, on one server over the tiny model started with `--lora` and
`--lora-modules`: a request names its adapter as `model`, /v1/models lists adapters with their parent,
the run-time load/unload endpoints (behind the API key) answer 409 for a full table, and /metrics shows
vLLM's lora_requests_info."""

import json

import httpx
import openai
import pytest
from lora_files import write_adapter
from server import Server

from jaxserve.cli import build_parser
from jaxserve.engine_args import EngineArgs

TINY = "tiny-llama"
KEY = "lora-key"


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-api")
    return {
        name: write_adapter(root / name, tiny.cfg, r, seed=r, std=0.15) for name, r in (("a", 4), ("b", 8), ("c", 2))
    }


@pytest.fixture(scope="module")
def server(tiny_dir, adapters):
    srv = Server(
        "--model",
        TINY,
        "--max-slots",
        "2",
        "--max-context",
        "128",
        "--lora",
        f"a={adapters['a']}",
        "--lora-modules",
        json.dumps({"name": "b", "path": str(adapters["b"])}),
        "--max-loras",
        "3",
        "--enable-lora-loading",
        checkpoints=tiny_dir.parent,
        api_key=KEY,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, path, body, key=KEY):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def text(client, model, **kw):
    r = client.completions.create(model=model, prompt="The Lord is my shepherd;", max_tokens=8, temperature=0, **kw)
    return [c.text for c in r.choices]


def test_models_lists_adapters_with_their_parent(client, adapters):
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(cards) == {TINY, "a", "b"}
    assert cards["a"]["parent"] == TINY and cards["a"]["root"] == str(adapters["a"])
    assert "parent" not in cards[TINY]


def test_requests_name_their_adapter_as_model(client):
    base, a, b = text(client, TINY), text(client, "a"), text(client, "b")
    assert len({base[0], a[0], b[0]}) == 3
    assert text(client, "a", n=2, seed=3) == a * 2  # n: every choice computes with the adapter
    with pytest.raises(openai.NotFoundError, match="'z' does not exist"):
        text(client, "z")


def test_load_and_unload_at_run_time(server, client, adapters):
    assert (
        post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["c"])}, key="no").status_code
        == 401
    )
    body = {"lora_name": "c", "lora_path": str(adapters["c"])}
    assert client.post("/load_lora_adapter", body=body, cast_to=str) == "Success: LoRA adapter 'c' added successfully."
    served = text(client, "c")
    assert served != text(client, TINY)
    full = post(server, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(adapters["c"])})
    assert full.status_code == 409 and full.json()["error"]["code"] == "adapter_table_full"
    taken = post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(adapters["c"])})
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "lora_name"
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    gone = post(server, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    with pytest.raises(openai.NotFoundError):
        text(client, "c")
    bad = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "c"}).json()["error"]["param"] == "lora_path"
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["c"])}).status_code == 200
    assert text(client, "c") == served


def test_metrics_show_the_adapters(server, client):
    text(client, "a")
    metrics = httpx.get(server.url + "/metrics").text
    assert 'vllm:lora_requests_info{max_lora="3",running_lora_adapters="",waiting_lora_adapters=""}' in metrics


def test_batch_takes_the_same_flags():
    """`jaxserve batch` builds its engine from the same LoRA flags (a line's `model` then picks the adapter
    through the same serving code as the requests above)."""
    args = build_parser().parse_args(
        ["batch", "in", "out", "--lora", "a=/x", "--lora-modules", "b=/y", "--max-lora-rank", "8"]
    )
    assert EngineArgs.from_args(args).lora_settings() == dict(
        loras={"a": "/x", "b": "/y"}, max_loras=2, max_lora_rank=8
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["batch", "in", "out", "--lora", "no-directory"])
