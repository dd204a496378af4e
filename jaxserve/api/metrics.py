"""Prometheus metrics through prometheus_client, one CollectorRegistry per server (never the global one).

Two families of series. jaxserve's own (unlabelled, as before): HTTP responses by status, tokens, the
scheduler's queue and slots, compiles and steps, time to first token and mean time per output token. And
vLLM's names, labelled `model_name` (the first served id), which the Kubernetes inference gateway and vLLM
dashboards read: requests waiting and running, KV-cache usage, prefix-cache queries and hits, latency
histograms, token counters, finished requests by reason, preemptions.

Scrape-time values (queue, slots, KV pages, prefix cache, preemptions, compiles) are read by a collector
from one `EngineStats` snapshot of the scheduler, never from its internals; per-request values are observed
by `serving` when a request ends, finished or not (a request ended by its deadline or by the client going
away counts as finished_reason="abort").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from jaxserve.engine.types import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# vLLM's buckets, so that its dashboards' quantiles read the same
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
FINISH_REASONS = ("stop", "length", "abort")
MODEL = ["model_name"]


@dataclasses.dataclass
class RequestRecord:
    """What one completion request did, observed when it ends."""

    ttft: float | None  # seconds to its first generated token; None if none came
    e2e: float  # seconds from arrival to its end
    inter_token: list[float]  # one interval per generated token after each choice's first
    queue: list[float]  # per prompt: seconds from submission to admission (prompts that were admitted)
    prompt_tokens: int
    generation_tokens: int
    finish_reasons: list[str]  # one per choice: stop, length or abort


class _EngineCollector(Collector):
    """Values read from the scheduler's stats snapshot at scrape time."""

    def __init__(self, model_name: str, scheduler: Any):
        self.model_name, self.scheduler = model_name, scheduler

    def collect(self) -> Iterator[Metric]:
        s: EngineStats = self.scheduler.stats()
        yield GaugeMetricFamily("jaxserve_queue_depth", "prompts waiting for slots", value=s.queue_depth)
        yield GaugeMetricFamily("jaxserve_active_slots", "slots holding a sequence", value=s.active_slots)
        if s.compiles is not None:
            yield CounterMetricFamily("jaxserve_compiles", "jitted steps compiled", value=s.compiles)
        yield CounterMetricFamily("jaxserve_engine_steps", "decode steps run", value=s.steps)
        if s.variants_pending is not None:
            yield GaugeMetricFamily(
                "jaxserve_step_variants_pending",
                "step shapes the background warm-up is still compiling (requests meanwhile use wider ones)",
                value=s.variants_pending,
            )
        if s.formulation is not None:
            yield InfoMetricFamily(
                "jaxserve_matmul_formulation",
                "how the weight matmuls compute: float weights in their dtype; int8 by rows in jaxserve's kernel, "
                "f32 or bf16, e.g. kernel<8<=f32<32<=bf16 (the kernel below 8 rows, bfloat16 products from 32 on)",
                value={
                    "formulation": s.formulation,
                    "kernel_below_rows": str(s.kernel_below_rows or ""),
                    "bf16_from_rows": str(s.bf16_from_rows or ""),
                },
            )
        if s.max_loras:  # vLLM's: the adapters of running and waiting requests in labels, the time as value
            info = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "LoRA adapters of running and waiting requests",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            labels = [str(s.max_loras), ",".join(s.running_adapters), ",".join(s.waiting_adapters)]
            info.add_metric(labels, time.time())
            yield info
        yield GaugeMetricFamily("jaxserve_kv_pages", "pages in the KV pool", value=s.kv_pages)
        yield GaugeMetricFamily("jaxserve_kv_pages_held", "KV pages held by sequences", value=s.kv_pages_held)
        yield GaugeMetricFamily("jaxserve_kv_pages_cached", "KV pages holding a cached prefix", value=s.kv_pages_cached)
        yield CounterMetricFamily("jaxserve_kv_evictions", "cached pages evicted", value=s.kv_evictions)
        for family, name, doc, value in (
            (GaugeMetricFamily, "vllm:num_requests_waiting", "requests waiting to be scheduled", s.queue_depth),
            (
                GaugeMetricFamily,
                "vllm:num_requests_running",
                "sequences in the running batch (one per slot)",
                s.active_slots,
            ),
            (
                GaugeMetricFamily,
                "vllm:kv_cache_usage_perc",
                "fraction of KV-cache pages held by sequences, 0-1",
                s.kv_pages_held / max(s.kv_pages, 1),
            ),
            (CounterMetricFamily, "vllm:prefix_cache_queries", "prompt tokens looked up", s.prefix_queried_tokens),
            (CounterMetricFamily, "vllm:prefix_cache_hits", "prompt tokens found cached", s.prefix_hit_tokens),
            (CounterMetricFamily, "vllm:num_preemptions", "sequences preempted for KV pages", s.preemptions),
        ):
            metric = family(name, doc, labels=MODEL)
            metric.add_metric([self.model_name], value)
            yield metric


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name: str | None = None
        self._engine: _EngineCollector | None = None
        self.requests = Counter("jaxserve_requests", "HTTP responses by status", ["status"], registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "prompt tokens of requests", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "tokens generated", registry=r)
        self.timeouts = Counter("jaxserve_request_timeouts", "requests ended by their deadline", registry=r)
        self.ttft = Histogram(
            "jaxserve_time_to_first_token_seconds", "time to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.per_token = Histogram(
            "jaxserve_time_per_output_token_seconds",
            "a request's mean time per output token after the first",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.v_prompt = Counter("vllm:prompt_tokens", "prefill tokens processed", MODEL, registry=r)
        self.v_generation = Counter("vllm:generation_tokens", "generation tokens processed", MODEL, registry=r)
        self.v_success = Counter(
            "vllm:request_success", "finished requests by finish reason", [*MODEL, "finished_reason"], registry=r
        )
        self.v_ttft = Histogram(
            "vllm:time_to_first_token_seconds", "time to first token", MODEL, buckets=VLLM_TTFT_BUCKETS, registry=r
        )
        self.v_itl = Histogram(
            "vllm:inter_token_latency_seconds", "inter-token latency", MODEL, buckets=VLLM_ITL_BUCKETS, registry=r
        )
        self.v_e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "end-to-end request latency",
            MODEL,
            buckets=VLLM_LATENCY_BUCKETS,
            registry=r,
        )
        self.v_queue = Histogram(
            "vllm:request_queue_time_seconds", "time waiting for slots", MODEL, buckets=VLLM_LATENCY_BUCKETS, registry=r
        )

    def attach(self, model_name: str, scheduler: Any) -> None:
        """Once the engine runs: read its queue and slots at scrape time, and label vLLM's series."""
        if self._engine is not None:  # a new engine for the same server state replaces the old one
            self.registry.unregister(self._engine)
        self.model_name, self._engine = model_name, _EngineCollector(model_name, scheduler)
        self.registry.register(self._engine)
        self.v_prompt.labels(model_name)  # series at 0 from the start, as a scraper expects
        self.v_generation.labels(model_name)
        for reason in FINISH_REASONS:
            self.v_success.labels(model_name, reason)

    def count_request(self, status: int) -> None:
        self.requests.labels(str(status)).inc()

    def count_timeout(self) -> None:
        self.timeouts.inc()

    def observe(self, rec: RequestRecord) -> None:
        self.prompt_tokens.inc(rec.prompt_tokens)
        self.generation_tokens.inc(rec.generation_tokens)
        if rec.ttft is not None:
            self.ttft.observe(rec.ttft)
            if rec.generation_tokens > 1:
                self.per_token.observe((rec.e2e - rec.ttft) / (rec.generation_tokens - 1))
        if self.model_name is None:
            return
        m = self.model_name
        self.v_prompt.labels(m).inc(rec.prompt_tokens)
        self.v_generation.labels(m).inc(rec.generation_tokens)
        if rec.ttft is not None:
            self.v_ttft.labels(m).observe(rec.ttft)
        for interval in rec.inter_token:
            self.v_itl.labels(m).observe(interval)
        self.v_e2e.labels(m).observe(rec.e2e)
        for queued in rec.queue:
            self.v_queue.labels(m).observe(queued)
        for reason in rec.finish_reasons:
            self.v_success.labels(m, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
