"""The `jaxserve` command line as a user runs it."""

import subprocess
import sys


def run(*args, env_root):
    return subprocess.run(
        [sys.executable, "-m", "jaxserve.cli", *args, "--checkpoints", str(env_root)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_continues_the_corpus(tiny_dir):
    result = run(
        "generate", "The Lord is my shepherd", "--model", "tiny-llama", "--max-tokens", "12", env_root=tiny_dir.parent
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("; I shall not want.")
    assert "tok/s" in result.stderr


def test_generate_with_temperature_is_seeded(tiny_dir):
    args = ("generate", "It was the", "--model", "tiny-llama", "--max-tokens", "12", "--temperature", "1.5")
    a = run(*args, "--seed", "1", env_root=tiny_dir.parent)
    b = run(*args, "--seed", "1", env_root=tiny_dir.parent)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_default_model_says_paris(smollm2_dir):
    result = run("generate", "The capital of France is", "--max-tokens", "3", env_root=smollm2_dir.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" Paris.")


def test_unknown_model_is_a_clear_error(tmp_path):
    result = run("generate", "hi", "--model", "no-such-model", env_root=tmp_path)
    assert result.returncode == 2
    assert "no model card 'no-such-model'" in result.stderr


def test_compiled_steps_are_reused_across_runs(tiny_dir, tmp_path):
    cache = tmp_path / "xla"
    args = ("generate", "Call me", "--model", "tiny-llama", "--max-tokens", "4", "--compile-cache", str(cache))
    first = run(*args, env_root=tiny_dir.parent)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert entries  # the first run wrote its compiled steps
    second = run(*args, env_root=tiny_dir.parent)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries  # the second compiled nothing new


def test_weights_default_to_the_model_cards_choice():
    from jaxserve.cli import build_parser
    from jaxserve.engine_args import quantize_choice

    parse = build_parser().parse_args
    assert quantize_choice(parse(["serve"])) == "gguf"  # smollm2-135m-instruct's card serves its file's blocks
    assert quantize_choice(parse(["serve", "--quantize", "none"])) is None  # float weights on request
    assert quantize_choice(parse(["batch", "in.jsonl", "out.jsonl", "--model", "tiny-llama"])) is None


def test_the_formulation_is_measured_unless_forced():
    from jaxserve.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve"]).formulation == "auto"
    assert parse(["generate", "hi", "--formulation", "bf16"]).formulation == "bf16"
    assert parse(["batch", "in.jsonl", "out.jsonl", "--formulation", "f32"]).formulation == "f32"
    assert parse(["serve", "--formulation", "kernel"]).formulation == "kernel"
    from jaxserve.device.formulation import FORMULATIONS

    flag = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions if a.dest == "formulation"
    )
    assert tuple(flag.choices) == FORMULATIONS  # the CLI offers every formulation the engine has


def test_serve_ends_with_an_error_when_the_model_cannot_load(tmp_path):
    from server import free_port

    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--model", "no-such-model", "--port", str(free_port())]
    result = subprocess.run([*cmd, "--checkpoints", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxserve: error: the model failed to load:") and "no model card 'no-such-model'" in last
