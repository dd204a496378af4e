"""The engine's command-line flags, declared once for `serve`, `generate` and `batch` (as vLLM's
`EngineArgs`): a frozen dataclass whose `add_cli_args` declares its flags on a subcommand and whose
`from_args` reads them back, then the steps from those values to a loaded model and a built engine.

Flags and environment variables are read here and in `cli.py` only; the library below takes plain values.
Nothing heavy is imported at module level: `jaxserve --help` loads no jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxserve.checkpoint import LoadedModel
    from jaxserve.engine.scheduler import Scheduler
    from jaxserve.multihost.group import Group

DEFAULT_CHECKPOINTS = "checkpoints"
MODEL_HELP = "model name (card or checkpoint), checkpoint folder, or Hugging Face checkpoint directory"


def checkpoint_root(arg: str | None) -> Path:
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


def parse_bytes(text: str) -> int:
    """'2GB' / '512MiB' / '1e9' -> bytes (decimal units, and binary ones with an i)."""
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    units |= {f"{u}I": 1 << (10 * i) for i, u in enumerate("KMGT", 1)}
    number = text.strip().upper().removesuffix("B")
    unit = next((u for u in sorted(units, key=len, reverse=True) if u and number.endswith(u)), "")
    try:
        value = float(number[: len(number) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 512MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(value)


def quantize_choice(args: Any) -> str | None:
    """--quantize, else the model card's default; "none" asks for float weights. `args`: anything with
    `model` and `quantize` (parsed flags, or EngineArgs)."""
    if args.quantize is None:
        from jaxserve.checkpoint import find_card

        card = find_card(args.model)
        return card.quantize if card else None
    return None if args.quantize == "none" else args.quantize


def lora_module(text: str) -> tuple[str, str]:
    """'NAME=DIR', or vLLM's JSON form '{"name": NAME, "path": DIR, ...}' -> (NAME, DIR)."""
    if text.lstrip().startswith("{"):
        import json

        try:
            spec = json.loads(text)
            return str(spec["name"]), str(spec["path"])
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f'not {{"name": ..., "path": ...}}: {text!r}') from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"not NAME=DIR: {text!r}")
    return name, path


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """Where converted checkpoints live and which weights: the engine's flags and `convert`'s."""
    p.add_argument(
        "--checkpoints",
        help="folder of converted checkpoints "
        "(default: $JAXSERVE_CHECKPOINTS, ./checkpoints, or ~/.cache/jaxserve/checkpoints)",
    )
    p.add_argument(
        "--quantize",
        choices=["gguf", "int4", "int8", "none"],  # jaxserve.checkpoint.QUANTIZE and none
        help="gguf: a GGUF file's own Q4_0/Q4_1/Q8_0 blocks as stored (weights of other types in Q8_0); "
        "int4: Q4_1 blocks of 32 inputs (embedding Q8_0); int8: a scale per output channel and 64 inputs; "
        "each converted once into checkpoints/NAME-QUANTIZE; or none: the float weights, exact (default: the "
        "model card's choice; gguf for smollm2-135m-instruct)",
    )


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """What the engine is built from, as the flags give it (each field is the flag of the same name)."""

    model: str
    checkpoints: str | None = None
    quantize: str | None = None  # None: the model card's choice (see quantize_choice)
    dtype: str | None = None
    mesh: str | None = None
    compile_cache: str | None = None
    formulation: str = "auto"
    kv_cache_dtype: str = "auto"  # the KV page pool's dtype; auto: the model's (--dtype)
    # capacity (serve and batch): generate runs one slot with a cache just long enough for its prompt
    max_slots: int | None = None
    max_context: int | None = None
    kv_cache_memory: int | None = None
    num_pages: int | None = None
    page_size: int = 128  # device.runner.PAGE_SIZE (not imported here: no jax for --help)
    prefix_caching: bool = True
    # LoRA adapters (serve and batch): (name, PEFT directory) pairs, and the stack they are served from
    lora: tuple[tuple[str, str], ...] = ()
    lora_modules: tuple[tuple[str, str], ...] = ()  # vLLM's spelling of --lora
    max_loras: int | None = None  # None: as many as given, at least 1 with enable_lora_loading
    max_lora_rank: int = 16
    enable_lora_loading: bool = False  # a serve flag: adapters may be loaded at run time
    # several processes (hosts) serving one model: see jaxserve.multihost
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: str | None = None
    heartbeat_timeout: float = 10.0

    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser, capacity: bool = True) -> None:
        """Declare the engine's flags on subcommand `p`; `capacity`: the slots, context and KV pool too."""
        from jaxserve.checkpoint import DEFAULT_MODEL

        p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
        add_checkpoint_flags(p)
        p.add_argument("--mesh", help="e.g. data=1,model=2 (default: all devices on 'model')")
        p.add_argument(
            "--dtype", choices=["float32", "bfloat16"], help="weights and activations (default: the model's)"
        )
        p.add_argument(
            "--kv-cache-dtype",
            choices=["auto", "float32", "bfloat16"],  # model.config.KV_DTYPES and auto (jax not imported)
            default="auto",
            help="what the KV page pool holds: bfloat16 halves its bytes (twice the tokens in --kv-cache-memory; "
            "attention still computes in float32 from the rounded keys and values); auto: the model's dtype "
            "(default: auto)",
        )
        p.add_argument(
            "--compile-cache",
            help="folder for compiled steps, reused across runs ('off' to disable; "
            "default $JAXSERVE_COMPILE_CACHE or ~/.cache/jaxserve/xla)",
        )
        p.add_argument(
            "--formulation",
            choices=["auto", "f32", "bf16", "kernel", "q8"],  # device.formulation.FORMULATIONS (jax not imported)
            default="auto",
            help="how quantized matmuls compute: kernel (jaxserve's kernels, compiled here with g++; CPU, one "
            "device), q8 (GGUF blocks only: the kernel on activations quantized to 8 bits, AVX512-VNNI), f32 "
            "(weights widened to float32), bf16 (bfloat16 products, float32 sums), or auto: on CPU the "
            "fastest at each decode batch size, measured once per machine and model and cached beside the "
            "compiled steps; bf16 on GPU/TPU (default: auto)",
        )
        g = p.add_argument_group("several processes (hosts) serving one model, process 0 leading (jax.distributed)")
        g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, which it binds for the group")
        g.add_argument("--num-processes", type=int, metavar="N", help="processes in the group")
        g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
        g.add_argument(
            "--distributed",
            choices=["auto"],
            help="auto: the group as jax detects it (Cloud TPU slice, SLURM, ...) instead of the three flags above",
        )
        g.add_argument(
            "--heartbeat-timeout",
            type=float,
            default=10.0,
            help="seconds after which a process of the group that is dead or hung ends the group: process 0 fails "
            "open requests with 503, turns /health 503 and exits non-zero; the others exit non-zero (default 10)",
        )
        if not capacity:
            return
        from jaxserve.device.build import DEFAULT_CONTEXT, DEFAULT_SLOTS

        p.add_argument("--max-slots", type=int, default=DEFAULT_SLOTS, help="sequences decoded at once")
        p.add_argument(
            "--max-context",
            type=int,
            default=DEFAULT_CONTEXT,
            help="tokens per sequence (prompt + output), up to the model's own context; KV memory is "
            "--kv-cache-memory, shared by all sequences",
        )
        p.add_argument(
            "--kv-cache-memory",
            type=parse_bytes,
            help="memory for the KV page pool, e.g. 2GB (default: 1 GiB on a CPU host, half the free memory of an "
            "accelerator; never more than every slot at full context needs)",
        )
        p.add_argument("--num-pages", type=int, help="pages in the KV pool (instead of --kv-cache-memory)")
        p.add_argument("--page-size", type=int, default=128, help="tokens per KV page (default 128)")
        p.add_argument(
            "--no-prefix-caching",
            dest="prefix_caching",
            action="store_false",
            help="compute every prompt whole instead of reusing cached pages of earlier ones",
        )
        g = p.add_argument_group("LoRA adapters (PEFT directories), each served as a model id of its own")
        g.add_argument(
            "--lora", action="append", type=lora_module, default=[], metavar="NAME=DIR", help="an adapter (repeatable)"
        )
        g.add_argument(
            "--lora-modules",
            nargs="+",
            type=lora_module,
            default=[],
            metavar="NAME=DIR",
            help='vLLM\'s spelling of --lora (also its JSON form {"name": ..., "path": ...})',
        )
        g.add_argument(
            "--max-loras",
            type=int,
            help="adapters resident at once: the stacked adapter weights are sized for this many (default: the "
            "adapters given, at least 1 with --enable-lora-loading)",
        )
        g.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank r served (default 16)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        for name in ("lora", "lora_modules"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def lora_settings(self) -> dict:
        """build_engine's LoRA arguments; a name given twice is an error."""
        modules = self.lora + self.lora_modules
        loras = dict(modules)
        if len(loras) < len(modules):
            raise SystemExit("jaxserve: error: a LoRA adapter name is given twice")
        max_loras = self.max_loras
        if max_loras is None:
            max_loras = max(len(loras), int(self.enable_lora_loading))
        return dict(loras=loras, max_loras=max_loras, max_lora_rank=self.max_lora_rank)

    def compile_cache_dir(self) -> Path | None:
        return compile_cache_dir(self.compile_cache)

    def join(self) -> Group | None:
        """Join the group the flags name (its checkpoint prepared first); None: this process serves alone."""
        if self.distributed is None and self.coordinator is None:
            if self.num_processes is not None or self.process_id is not None:
                raise ValueError("--num-processes and --process-id go with --coordinator HOST:PORT")
            return None
        if self.distributed is None and (self.num_processes is None or self.process_id is None):
            raise ValueError("--coordinator needs --num-processes N and --process-id I")
        if self.num_processes is not None and not 0 <= (self.process_id or 0) < self.num_processes:
            raise ValueError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")
        if self.lora or self.lora_modules or self.max_loras or self.enable_lora_loading:
            raise ValueError("LoRA adapters are served by one process only (not yet with --coordinator/--distributed)")
        import functools

        from jaxserve.checkpoint import checkpoint_name, ensure_checkpoint
        from jaxserve.checkpoint.store import is_checkpoint
        from jaxserve.multihost.group import join, prepare_checkpoint

        root, quantize = checkpoint_root(self.checkpoints), quantize_choice(self)
        if not (is_checkpoint(Path(self.model)) or is_checkpoint(root / checkpoint_name(self.model, quantize))):
            prepare_checkpoint(functools.partial(ensure_checkpoint, self.model, root, False, quantize), root)
        return join(self.coordinator, self.num_processes, self.process_id, self.heartbeat_timeout)

    def load_model(self) -> LoadedModel:
        import jax

        from jaxserve.checkpoint import load_model
        from jaxserve.multihost.group import current
        from jaxserve.sharding import make_mesh, parse_mesh

        mesh = make_mesh(*parse_mesh(self.mesh)) if self.mesh else make_mesh(1, None)
        if current() is not None and mesh.size != jax.device_count():
            raise ValueError(
                f"--mesh {self.mesh} uses {mesh.size} devices; a group's mesh must use all {jax.device_count()} "
                f"({jax.process_count()} processes x {jax.local_device_count()})"
            )
        root = checkpoint_root(self.checkpoints)
        return load_model(self.model, root, mesh, dtype=self.dtype, quantize=quantize_choice(self))

    def follow(self, group: Group, model: LoadedModel | None = None, **settings) -> int:
        """A process of `group` other than 0: the same model and runner as process 0 (build_runner's
        `settings`, default: the flags' capacity), running its plans until it stops the group."""
        from jaxserve.device.build import build_runner
        from jaxserve.multihost.follower import follow

        runner = build_runner(model or self.load_model(), **(settings or self.runner_settings(group)))
        return follow(runner, group, grace=self.heartbeat_timeout + 30)

    def build_engine(self, model: LoadedModel, max_waiting: int = 256, background: bool = False) -> Scheduler:
        """The engine at the flags' capacity, its steps' executables kept in the compile cache's store
        (jax's persistent cache left off: one cache for each thing, see device/executables.py)."""
        from jaxserve.device.build import build_engine
        from jaxserve.multihost.group import current

        group = current()
        settings = self.runner_settings(group, background) | self.lora_settings()
        return build_engine(model, max_waiting, self.prefix_caching, group=group, **settings)

    def runner_settings(self, group: Group | None, background: bool = False) -> dict:
        """build_runner's arguments at the flags' capacity. In a group every process must make the same
        calls: every shape is ready before serving (no background compiling, whose progress differs between
        processes), and the formulation is not measured (the timings would differ too)."""
        from jaxserve.device.executables import FOLDER

        assert self.max_slots is not None, "a subcommand without the capacity flags sizes its own engine"
        cache = self.compile_cache_dir()
        return dict(
            slots=self.max_slots,
            max_context=self.max_context,
            kv_cache_memory=self.kv_cache_memory,
            num_pages=self.num_pages,
            page_size=self.page_size,
            kv_cache_dtype=self.kv_cache_dtype,
            formulation=self.group_formulation() if group is not None else self.formulation,
            formulation_cache=cache,
            executable_cache=None if cache is None else cache / FOLDER,
            background=background and group is None,
        )

    def group_formulation(self) -> str:
        """--formulation in a group: auto is float32 on CPU (bfloat16 elsewhere, unmeasured as alone)."""
        import jax

        return "f32" if self.formulation == "auto" and jax.default_backend() == "cpu" else self.formulation
