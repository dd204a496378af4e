"""Prometheus text-format metrics: a few counters, gauges read at scrape time, and two histograms."""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Callable

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self, gauges: dict[str, Callable[[], float]] | None = None):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # by HTTP status
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.gauges = gauges or {}

    def count_request(self, status: int) -> None:
        with self._lock:
            self.requests[status] += 1

    def observe_request(self, ttft: float | None, total: float, prompt_tokens: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            if ttft is not None:
                self.ttft.observe(ttft)
                if generated > 1:
                    self.per_token.observe((total - ttft) / (generated - 1))

    def render(self) -> str:
        with self._lock:
            lines = ["# TYPE jaxserve_requests_total counter"]
            lines += [f'jaxserve_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += [
                "# TYPE jaxserve_prompt_tokens_total counter",
                f"jaxserve_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE jaxserve_generation_tokens_total counter",
                f"jaxserve_generation_tokens_total {self.generation_tokens}",
            ]
            for name, read in self.gauges.items():
                lines += [f"# TYPE jaxserve_{name} gauge", f"jaxserve_{name} {read()}"]
            lines += ["# TYPE jaxserve_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("jaxserve_time_to_first_token_seconds")
            lines += ["# TYPE jaxserve_time_per_output_token_seconds histogram"]
            lines += self.per_token.lines("jaxserve_time_per_output_token_seconds")
        return "\n".join(lines) + "\n"
