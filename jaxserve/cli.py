"""The `jaxserve` command line. Flags and environment are read here and passed down as plain values."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from jaxserve.engine_args import EngineArgs, add_checkpoint_flags, checkpoint_root


def cmd_convert(args) -> int:
    from jaxserve.checkpoint import checkpoint_name, convert

    path = Path(args.path)
    name = args.name or (path.name if path.is_dir() else path.stem).lower()
    quantize = None if args.quantize == "none" else args.quantize
    out = checkpoint_root(args.checkpoints) / checkpoint_name(name, quantize)
    t0 = time.perf_counter()
    convert(path, out, max_context=args.max_context, quantize=quantize)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from jaxserve.device.build import build_engine, enable_compilation_cache
    from jaxserve.engine import bridge
    from jaxserve.engine.types import Delta, EngineRequest, SamplingParams

    engine = EngineArgs.from_args(args)
    group = engine.join()
    if (cache := engine.compile_cache_dir()) is not None:
        enable_compilation_cache(cache)

    model = engine.load_model()
    tok = model.tokenizer
    prompt_ids = tuple(tok.encode(args.prompt))
    # one slot, and a cache just long enough: shapes compile as they are first reached (in a group: in the
    # same order everywhere)
    needed = len(prompt_ids) + args.max_tokens
    formulation = engine.formulation if group is None else engine.group_formulation()
    settings = dict(
        max_context=max(128, 1 << (needed - 1).bit_length()),
        warmup=False,
        formulation=formulation,
        kv_cache_dtype=engine.kv_cache_dtype,
    )
    if group is not None and not group.leader:
        return engine.follow(group, model, slots=1, formulation_cache=cache, **settings)
    scheduler = build_engine(model, slots=1, formulation_cache=cache, group=group, **settings)
    req = EngineRequest(
        "generate",
        prompt_ids,
        max_tokens=args.max_tokens,
        seed=args.seed,
        sampling=SamplingParams(temperature=args.temperature),
        ignore_eos=args.ignore_eos,
    )
    t0 = time.perf_counter()
    first, n = None, 0
    try:
        for item in bridge.stream(scheduler, req):
            if isinstance(item, Delta) and item.tokens:
                first = first or time.perf_counter()
                n += len(item.tokens)
            if isinstance(item, Delta):
                sys.stdout.write(item.text)
                sys.stdout.flush()
    finally:
        scheduler.shutdown()
    sys.stdout.write("\n")
    end = time.perf_counter()
    if n > 1:
        print(
            f"[{n} tokens; first after {first - t0:.2f} s (includes compiling); then "
            f"{(n - 1) / (end - first):.1f} tok/s (includes compiling longer attention windows)]",
            file=sys.stderr,
        )
    return 0


def cmd_serve(args) -> int:
    import threading

    from jaxserve.api.app import create_app
    from jaxserve.api.metrics import Metrics

    if (group := (engine := EngineArgs.from_args(args)).join()) is not None and not group.leader:
        return engine.follow(group)  # no port: process 0 serves
    state = server_state(args, Metrics())
    holder: dict = {}
    server = _graceful_server_class(state)(uvicorn_config(create_app(state), args))

    def load() -> None:
        if not _load_for_serving(args, state, holder):
            server.should_exit = True  # a model that cannot load ends the process: nothing would ever be served

    loader = threading.Thread(target=load, name="jaxserve-loader", daemon=True)
    loader.start()  # the HTTP server answers (503 on /health) while the model loads and compiles
    server.run()  # returns after SIGINT/SIGTERM, once in-flight requests end or time out, or after a failed load
    loader.join(timeout=1)
    if "scheduler" in holder:
        from jaxserve.device.warmup import stop_compiling

        stop_compiling(holder["core"])  # a background warm-up still compiling: nothing more is started
        holder["scheduler"].shutdown()
    if state.load_error:
        print(f"jaxserve: error: {state.load_error}", file=sys.stderr)
        return 1
    logging.getLogger("jaxserve").info("stopped")
    return 0


def server_state(args, metrics):
    """The app's settings from the serve flags."""
    from jaxserve.api.app import ServerState

    return ServerState(
        metrics=metrics,
        api_key=args.api_key or os.environ.get("JAXSERVE_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout,
        request_timeout=args.request_timeout or None,
        lora_loading=args.enable_lora_loading,
    )


def uvicorn_config(app, args):
    """uvicorn's settings from the serve flags: connection limit, keep-alive and header deadlines."""
    import uvicorn

    from jaxserve.api.transport import protocol_with_header_timeout

    return uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=args.shutdown_timeout,
        access_log=False,
        http=protocol_with_header_timeout(args.header_timeout),
        timeout_keep_alive=args.keep_alive_timeout,
        limit_concurrency=args.max_connections or None,
    )


def _graceful_server_class(state):
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises a caught SIGINT/SIGTERM after its graceful shutdown, so the process dies by the
        signal; for us the graceful shutdown is the whole answer, and the command exits 0. From the signal on,
        the state is draining: /ready answers 503 on connections still open while in-flight requests end."""

        def handle_exit(self, sig, frame) -> None:
            state.draining = True
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return GracefulServer


def add_tool_call_flags(p: argparse.ArgumentParser) -> None:
    """Chat's tool-call format (serve and batch)."""
    p.add_argument(
        "--tool-call-parser",
        choices=["hermes", "llama3_json", "mistral"],  # engine.toolcalls.FORMATS
        help="the format chat tool calls are read in and constrained to (default: the one the chat template "
        "teaches; hermes for templates that take no tools)",
    )


def _build_serving(args, metrics, aliases: list[str], max_waiting: int = 256, background: bool = False):
    """Model + started scheduler + CompletionServing from the engine's flags (serve and batch); `background`:
    serve once the shapes every request can fall back to are ready, compiling the others meanwhile."""
    from jaxserve.api.serving import CompletionServing

    engine = EngineArgs.from_args(args)
    model = engine.load_model()
    scheduler = engine.build_engine(model, max_waiting, background)
    weights = model.cfg.quant or model.cfg.dtype
    serving = CompletionServing(
        scheduler,
        model.tokenizer,
        [model.name, *aliases],
        metrics,
        fingerprint=f"jaxserve-{model.name}-{weights}",
        tool_parser=args.tool_call_parser,
    )
    return model, scheduler, serving


def _load_for_serving(args, state, holder) -> bool:
    """Load, compile and start the engine into `state`; False (with `state.load_error` set) if that failed."""
    log = logging.getLogger("jaxserve.serve")
    try:
        t0 = time.perf_counter()
        model, scheduler, serving = _build_serving(
            args, state.metrics, args.served_model_name, args.max_waiting, background=True
        )
        holder["scheduler"] = scheduler
        core = holder["core"] = scheduler.core
        state.serving = serving
        log.info(
            "serving %s as %s on http://%s:%d | mesh %s | weights %s, matmuls %s | %d slots of up to %d tokens "
            "| KV pool %d tokens (%.2f GB, %s) | ready in %.1f s",
            model.name,
            ", ".join(serving.model_ids),
            args.host,
            args.port,
            dict(model.mesh.shape),
            model.cfg.quant or model.cfg.dtype,
            core.model.formulation.describe(core.cfg),
            core.slots,
            core.cache_len,
            core.pages * core.page_size,
            core.kv_bytes / 1e9,
            core.cfg.cache_dtype,
            time.perf_counter() - t0,
        )
    except Exception as e:
        log.exception("loading failed")
        state.load_error = f"the model failed to load: {e}"
        return False
    return True


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), shard I of N counted from 0."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"not a shard I/N with 0 <= I < N: {text!r} (e.g. 0/3)")
    return int(index), int(count)


# where a job array's runner puts each task's index: a Kubernetes Indexed Job, a SLURM job array
SHARD_INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")


def shard_choice(args) -> tuple[int, int] | None:
    """--shard I/N; or --num-shards N with I from the job array's environment; None: the whole input."""
    if args.num_shards is None:
        return args.shard
    if args.num_shards < 1:
        raise ValueError(f"--num-shards must be at least 1, got {args.num_shards}")
    var = next((var for var in SHARD_INDEX_VARIABLES if os.environ.get(var)), None)
    if var is None:
        raise ValueError(
            f"--num-shards needs this shard's index in ${' or $'.join(SHARD_INDEX_VARIABLES)}; or give --shard I/N"
        )
    try:
        return parse_shard(f"{os.environ[var]}/{args.num_shards}")
    except argparse.ArgumentTypeError:
        hint = f" (submit the array as --array=0-{args.num_shards - 1})" if var == "SLURM_ARRAY_TASK_ID" else ""
        raise ValueError(
            f"${var}={os.environ[var]!r} is not a shard index below --num-shards {args.num_shards}{hint}"
        ) from None


def read_batch_input(path: str, prompts: bool, defaults: dict):
    """INPUT's requests in order, in the OpenAI Batch form or (`prompts`) the plain one; duplicate ids refused."""
    from jaxserve.batch import check_duplicates, parse_batch_lines, parse_prompt_lines

    lines = Path(path).read_text(encoding="utf-8").splitlines()
    items = parse_prompt_lines(lines, defaults) if prompts else parse_batch_lines(lines)
    check_duplicates(items)
    return items


def cmd_batch(args) -> int:
    import asyncio

    from jaxserve.api.metrics import Metrics
    from jaxserve.batch import run_batch
    from jaxserve.batch_shards import select_shard

    shard = shard_choice(args)  # before any work: a job array's bad index fails at once
    if (group := (engine := EngineArgs.from_args(args)).join()) is not None and not group.leader:
        return engine.follow(group)
    defaults: dict = {}
    if args.prompts:
        defaults = {
            "model": args.model_id or Path(args.model).name,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "n": args.n,
            "echo": args.echo,
        }
        for key in ("stop", "seed", "logprobs"):
            if getattr(args, key) is not None:
                defaults[key] = getattr(args, key)
    items = read_batch_input(args.input, args.prompts, defaults)
    if shard is not None:
        total, items = len(items), select_shard(items, *shard)
        print(f"batch: shard {shard[0]}/{shard[1]}: {len(items)} of {total} requests", file=sys.stderr)
    _, scheduler, serving = _build_serving(args, Metrics(), [args.model_id] if args.model_id else [])
    try:
        summary = asyncio.run(run_batch(serving, items, Path(args.output), concurrency=2 * args.max_slots))
    finally:
        scheduler.shutdown()
    print(f"batch: {summary}", file=sys.stderr)
    return 0 if summary.failed == 0 else 1


def cmd_batch_merge(args) -> int:
    from jaxserve.batch_shards import merge_outputs

    items = read_batch_input(args.input, args.prompts, {})
    failed = merge_outputs([item.custom_id for item in items], [Path(p) for p in args.shard_outputs], Path(args.output))
    print(
        f"batch-merge: {len(items)} results from {len(args.shard_outputs)} shard outputs into {args.output} "
        f"({failed} with an error status)",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="JAX-native LLM inference server")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert", help="convert a GGUF file or a Hugging Face checkpoint directory into an orbax checkpoint"
    )
    p.add_argument("path", help="the .gguf file, or a directory of config.json, *.safetensors and tokenizer files")
    add_checkpoint_flags(p)
    p.add_argument("--name", help="checkpoint name (default: the file's stem or the directory's name)")
    p.add_argument("--max-context", type=int, help="cap the context length (default: the file's)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="print a continuation of PROMPT as it is produced")
    p.add_argument("prompt")
    EngineArgs.add_cli_args(p, capacity=False)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the OpenAI Completions API over HTTP")
    EngineArgs.add_cli_args(p)
    add_tool_call_flags(p)
    p.add_argument(
        "--served-model-name", action="append", default=[], help="another model id clients may use (repeatable)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get a 413")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=0,
        help="seconds a completion may take, queued and running: past it a waiting request gets a 503 with "
        "Retry-After and a running one a 504 (in a stream: an error event, then [DONE]) (default 0: no bound)",
    )
    p.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds a client has to send a request's headers"
    )
    p.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a client has to send a request's body (then 408)"
    )
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle connection is kept open")
    p.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections (and requests in flight) beyond which new requests get a 503 (0: no limit)",
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $JAXSERVE_API_KEY)")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM",
    )
    p.add_argument(
        "--enable-lora-loading",
        action="store_true",
        help="POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} "
        "(with --api-key, behind it); --max-loras is then at least 1",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "batch",
        help="run a JSONL file of completion requests (OpenAI Batch "
        "format), appending results to OUTPUT; a rerun resumes",
    )
    p.add_argument("input")
    p.add_argument("output")
    EngineArgs.add_cli_args(p)
    add_tool_call_flags(p)
    p.add_argument("--model-id", help="another model id the input's bodies may name")
    plain = p.add_argument_group('plain form: INPUT holds one prompt per line (text or {"prompt": ...})')
    plain.add_argument("--prompts", action="store_true", help="read INPUT in the plain form")
    plain.add_argument("--max-tokens", type=int, default=16)
    plain.add_argument("--temperature", type=float, default=1.0)
    plain.add_argument("--top-p", type=float, default=1.0)
    plain.add_argument("--n", type=int, default=1)
    plain.add_argument("--stop", action="append", help="a stop string (repeatable)")
    plain.add_argument("--seed", type=int)
    plain.add_argument("--logprobs", type=int)
    plain.add_argument("--echo", action="store_true")
    shards = p.add_argument_group("one shard of a batch spread over many machines (merge with batch-merge)")
    choice = shards.add_mutually_exclusive_group()
    choice.add_argument(
        "--shard", type=parse_shard, metavar="I/N", help="run shard I of N (from 0): every N-th request from the I-th"
    )
    choice.add_argument(
        "--num-shards",
        type=int,
        metavar="N",
        help="run shard I of N, I from $JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) or $SLURM_ARRAY_TASK_ID",
    )
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(
        "batch-merge",
        help="write the outputs of a sharded batch as one, in INPUT's order; fails on a custom_id missing or "
        "duplicated",
    )
    p.add_argument("input", help="the batch's INPUT, as given to every shard")
    p.add_argument("output")
    p.add_argument("shard_outputs", nargs="+", metavar="shard_output", help="every shard's OUTPUT")
    p.add_argument("--prompts", action="store_true", help="INPUT is in the plain form (as for batch --prompts)")
    p.set_defaults(func=cmd_batch_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )  # jax's absl import installs a root handler first
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        code = 2
    from jaxserve.multihost.group import leave

    return leave(code)  # in a group: process 0 stops the others


if __name__ == "__main__":
    sys.exit(main())
