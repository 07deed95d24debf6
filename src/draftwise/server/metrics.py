"""Prometheus metrics of one server, under vLLM's names (plus `draftwise:` copies).

draftwise's own, beside them: `draftwise:target_passes`, and for structured output
`draftwise:forced_tokens` (tokens a grammar forced, accepted without any speculator's
guess) and `draftwise:forced_draft_tokens` (forced tokens verified).

Each app gets its own CollectorRegistry, so several apps (tests) never collide. All
updates come from the engine thread; prometheus_client is thread safe for reads by
the /metrics handler.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
PREFIXES = ("vllm", "draftwise")


class ServerMetrics:
    def __init__(self, model_name: str, num_positions: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, m = self.registry, ["model_name"]

        def both(kind, name: str, doc: str, labels=m, **kw) -> list:
            return [kind(f"{p}:{name}", doc, labels, registry=r, **kw).labels(model_name)
                    if labels == m else kind(f"{p}:{name}", doc, labels, registry=r, **kw) for p in PREFIXES]

        self.drafts = both(Counter, "spec_decode_num_drafts", "Speculative drafts verified (one per request and step).")
        self.draft_tokens = both(Counter, "spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.accepted_tokens = both(Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = both(Counter, "spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted at each draft position.", ["model_name", "position"])
        self.prompt_tokens = both(Counter, "prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = both(Counter, "generation_tokens", "Tokens generated.")
        self.request_success = both(Counter, "request_success", "Finished requests by reason.",
                                    ["model_name", "finished_reason"])
        self.ttft = both(Histogram, "time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS)
        self.itl = both(Histogram, "inter_token_latency_seconds",
                        "Time between successive outputs of a request (one per engine step).", buckets=ITL_BUCKETS)
        self.e2e = both(Histogram, "e2e_request_latency_seconds", "Request latency, arrival to finish.",
                        buckets=E2E_BUCKETS)
        self.running = both(Gauge, "num_requests_running", "Requests holding a cache row.")
        self.waiting = both(Gauge, "num_requests_waiting", "Requests waiting for a cache row.")
        for j in range(num_positions):  # as vLLM: every draft position is exported from the start
            for c in self.accepted_per_pos:
                c.labels(model_name, str(j))
        self.target_passes = [Counter("draftwise:target_passes", "Target forward passes per request (prefill "
                                      "included), summed.", m, registry=r).labels(model_name)]
        self.forced_tokens = Counter("draftwise:forced_tokens", "Tokens a grammar forced (structured output), "
                                     "accepted: free drafts no speculator drafted.", m, registry=r).labels(model_name)
        self.forced_drafted = Counter("draftwise:forced_draft_tokens", "Forced tokens verified (structured output).",
                                      m, registry=r).labels(model_name)

    # --- updates (engine thread) ---------------------------------------------------------

    def observe_spec(self, drafts: int, draft_tokens: int, accepted: int, per_pos: list[int]) -> None:
        for c in self.drafts:
            c.inc(drafts)
        for c in self.draft_tokens:
            c.inc(draft_tokens)
        for c in self.accepted_tokens:
            c.inc(accepted)
        for j, n in enumerate(per_pos):
            if n:
                for c in self.accepted_per_pos:
                    c.labels(self.model_name, str(j)).inc(n)

    def observe_tokens(self, prompt: int = 0, generation: int = 0, passes: int = 0) -> None:
        for c in self.prompt_tokens:
            c.inc(prompt)
        for c in self.generation_tokens:
            c.inc(generation)
        for c in self.target_passes:
            c.inc(passes)

    def observe_forced(self, accepted: int, drafted: int) -> None:
        self.forced_tokens.inc(accepted)
        self.forced_drafted.inc(drafted)

    def observe_first_token(self, seconds: float) -> None:
        for h in self.ttft:
            h.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        for h in self.itl:
            h.observe(seconds)

    def observe_finished(self, reason: str, seconds: float) -> None:
        for c in self.request_success:
            c.labels(self.model_name, reason).inc()
        for h in self.e2e:
            h.observe(seconds)

    def set_queue(self, running: int, waiting: int) -> None:
        for g in self.running:
            g.set(running)
        for g in self.waiting:
            g.set(waiting)

    def watch(self, method: str, report) -> None:
        """Export what `report()` (a speculator's `Proposer.report`) says at each scrape, as
        gauges `draftwise:<method>_<key>` (e.g. draftwise:adaptive_learner_steps)."""
        self.registry.register(_ReportCollector(self.model_name, method, report))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReportCollector:
    """Reads a speculator's report at scrape time (values are plain numbers: reading them
    from the handler thread while the engine thread updates them is safe)."""

    def __init__(self, model_name: str, method: str, report) -> None:
        self.model_name, self.method, self.report = model_name, method, report

    def describe(self):
        return []

    def collect(self):
        for key, value in sorted(dict(self.report()).items()):
            g = GaugeMetricFamily(f"draftwise:{self.method}_{key}", f"{self.method} speculator: {key}",
                                  labels=["model_name"])
            g.add_metric([self.model_name], float(value))
            yield g
