"""Prometheus metrics of the server, named as vLLM names them (``pagedllm:`` instead of
``vllm:``) so dashboards built for vLLM need only the prefix changed.

Gauges (requests running and waiting, KV cache usage, prefix-cache hit rate) are read from
the async engine's published stats when Prometheus scrapes; counters and histograms are
fed by the engine thread through ``on_output`` as tokens are produced, so time to first
token and inter-token latency are measured where the tokens appear, not where a slow client
happens to read them.  Each server has its own ``CollectorRegistry``: no global state.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily

from pagedllm.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineGauges:
    """A collector that reads the engine's state at scrape time."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s = self.engine.stats()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, float(v))
            return g

        total = s.get("kv_blocks_total") or 0
        free = s.get("kv_blocks_free") or 0
        yield gauge("pagedllm:num_requests_running", "Requests in the running batch.",
                    s.get("num_running", 0))
        yield gauge("pagedllm:num_requests_waiting", "Requests accepted and waiting to run.",
                    s.get("num_waiting", 0))
        yield gauge("pagedllm:kv_cache_usage_perc",
                    "Fraction of KV cache blocks in use (1 = full).",
                    (total - free) / total if total else 0.0)
        yield gauge("pagedllm:kv_cache_blocks_total", "KV cache blocks in the pool.", total)
        yield gauge("pagedllm:kv_cache_blocks_free", "KV cache blocks free.", free)
        yield gauge("pagedllm:prefix_cache_hit_rate",
                    "Fraction of prompt tokens whose KV came from the prefix cache.",
                    s.get("prefix_cache_hit_rate", 0.0))
        yield gauge("pagedllm:num_preemptions", "Preemptions since start.",
                    s.get("num_preemptions", 0))
        yield gauge("pagedllm:engine_failed_steps", "Engine steps that raised since start.",
                    s.get("num_failed_steps", 0))


class ServerMetrics:
    """The server's registry; pass it to AsyncLLMEngine as ``observer``."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("pagedllm:prompt_tokens", "Prompt tokens prefilled.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("pagedllm:generation_tokens", "Tokens generated.",
                                         labels, registry=r).labels(model_name)
        self._success = Counter("pagedllm:request_success", "Requests finished, by reason.",
                                labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("pagedllm:time_to_first_token_seconds",
                              "Arrival to first token.", labels, buckets=TTFT_BUCKETS,
                              registry=r).labels(model_name)
        self.itl = Histogram("pagedllm:inter_token_latency_seconds",
                             "Time between consecutive tokens of a request.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("pagedllm:e2e_request_latency_seconds",
                             "Arrival to finish.", labels, buckets=E2E_BUCKETS,
                             registry=r).labels(model_name)
        self.http_errors = Counter("pagedllm:http_errors", "Error responses, by status.",
                                   labels + ["status"], registry=r)

    def attach(self, engine) -> None:
        """Add the gauges that read ``engine`` (an AsyncLLMEngine) at scrape time."""
        self.registry.register(_EngineGauges(engine, self.model_name))

    # ---- EngineObserver -------------------------------------------------------------------
    def on_output(self, output: RequestOutput, num_new_tokens: int,
                  interval: float | None) -> None:
        if num_new_tokens:
            self.generation_tokens.inc(num_new_tokens)
            if interval is None:  # the request's first tokens: its prompt is now computed
                self.prompt_tokens.inc(len(output.prompt_token_ids))
                m = output.metrics
                if m is not None and m.time_to_first_token is not None:
                    self.ttft.observe(m.time_to_first_token)
            else:
                for _ in range(num_new_tokens):
                    self.itl.observe(interval / num_new_tokens)
        if output.finished:
            reason = output.outputs[0].finish_reason or "abort"
            self._success.labels(self.model_name, reason).inc()
            m = output.metrics
            if m is not None and m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)

    def on_http_error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
