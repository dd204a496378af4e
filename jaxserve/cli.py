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
    from jaxserve.engine.generate import generate
    from jaxserve.tokenizer import IncrementalDetokenizer

    model = load_model(args.model, _checkpoint_root(args.checkpoints), _mesh(args.mesh))
    tok = model.tokenizer
    prompt_ids = tok.encode(args.prompt)
    detok = IncrementalDetokenizer(tok)
    stop_ids = () if args.ignore_eos or tok.eos_id is None else (tok.eos_id,)
    t0 = time.perf_counter()
    first = None
    n = 0
    for token in generate(model, prompt_ids, args.max_tokens, args.temperature, args.seed, stop_ids):
        if first is None:
            first = time.perf_counter()
        n += 1
        if token in stop_ids:
            break
        sys.stdout.write(detok.add(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    end = time.perf_counter()
    if n > 1:
        print(f"[{n} tokens; first after {first - t0:.2f} s (includes compile); then "
              f"{(n - 1) / (end - first):.1f} tok/s]", file=sys.stderr)
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
