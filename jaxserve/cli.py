"""The `jaxserve` command line. Flags and environment are read here and passed down as plain values."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINTS = "checkpoints"


def _checkpoint_root(arg: str | None) -> Path:
    """--checkpoints, else $JAXSERVE_CHECKPOINTS, else ./checkpoints in a source checkout, else the user cache."""
    if arg:
        return Path(arg)
    if os.environ.get("JAXSERVE_CHECKPOINTS"):
        return Path(os.environ["JAXSERVE_CHECKPOINTS"])
    if Path(DEFAULT_CHECKPOINTS).is_dir():
        return Path(DEFAULT_CHECKPOINTS)
    return Path.home() / ".cache" / "jaxserve" / "checkpoints"


def compile_cache_dir(arg: str | None) -> Path | None:
    """--compile-cache, else $JAXSERVE_COMPILE_CACHE, else ~/.cache/jaxserve/xla; 'off' disables it."""
    value = arg or os.environ.get("JAXSERVE_COMPILE_CACHE") or str(Path.home() / ".cache" / "jaxserve" / "xla")
    return None if value == "off" else Path(value)


def _mesh(spec: str | None):
    from jaxserve.sharding import make_mesh, parse_mesh

    if not spec:
        return make_mesh(1, None)
    return make_mesh(*parse_mesh(spec))


def cmd_convert(args) -> int:
    from jaxserve.checkpoint import convert_gguf

    name = args.name or Path(args.path).stem.lower()
    out = _checkpoint_root(args.checkpoints) / name
    t0 = time.perf_counter()
    convert_gguf(Path(args.path), out, max_context=args.max_context)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from jaxserve.checkpoint import load_model
    from jaxserve.engine import Delta, EngineRequest, SamplingParams, build_engine, enable_compilation_cache

    if (cache := compile_cache_dir(args.compile_cache)) is not None:
        enable_compilation_cache(cache)

    model = load_model(args.model, _checkpoint_root(args.checkpoints), _mesh(args.mesh))
    tok = model.tokenizer
    prompt_ids = tuple(tok.encode(args.prompt))
    # one slot, and a cache just long enough: shapes compile as they are first reached
    needed = len(prompt_ids) + args.max_tokens
    engine = build_engine(model, slots=1, max_context=max(128, 1 << (needed - 1).bit_length()), warmup=False)
    req = EngineRequest("generate", prompt_ids, max_tokens=args.max_tokens, seed=args.seed,
                        sampling=SamplingParams(temperature=args.temperature), ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    first, n = None, 0
    try:
        for item in engine.stream(req):
            if isinstance(item, Delta) and item.tokens:
                first = first or time.perf_counter()
                n += len(item.tokens)
            if isinstance(item, Delta):
                sys.stdout.write(item.text)
                sys.stdout.flush()
    finally:
        engine.shutdown()
    sys.stdout.write("\n")
    end = time.perf_counter()
    if n > 1:
        print(f"[{n} tokens; first after {first - t0:.2f} s (includes compiling); then "
              f"{(n - 1) / (end - first):.1f} tok/s (includes compiling longer attention windows)]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxserve.checkpoint import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="jaxserve", description="JAX-native LLM inference server")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoints", help="folder of converted checkpoints "
                        "(default: $JAXSERVE_CHECKPOINTS, ./checkpoints, or ~/.cache/jaxserve/checkpoints)")

    p = sub.add_parser("convert", parents=[common], help="convert a GGUF file into an orbax checkpoint")
    p.add_argument("path", help="the .gguf file")
    p.add_argument("--name", help="checkpoint name (default: the file's stem)")
    p.add_argument("--max-context", type=int, help="cap the context length (default: the file's)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", parents=[common], help="print a continuation of PROMPT as it is produced")
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name (card or checkpoint) or checkpoint folder")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--mesh", help="e.g. data=1,model=2 (default: all devices on 'model')")
    p.add_argument("--compile-cache", help="folder for compiled steps, reused across runs ('off' to disable; "
                   "default $JAXSERVE_COMPILE_CACHE or ~/.cache/jaxserve/xla)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # jax's absl import installs a root handler first
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
