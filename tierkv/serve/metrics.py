"""`GET /metrics`: what happened, in Prometheus' text format. The engine's figures are read at each scrape (per tier
and link, from `LLM.stats()`); request latencies are histograms observed as requests finish."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineCollector:
    """Reads the engine's stats at each scrape (`stats()` returns LLM.stats()'s dict)."""

    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        tiers = s["tiers"]
        families = {
            "tierkv_tier_used_blocks": GaugeMetricFamily(
                "tierkv_tier_used_blocks", "Blocks living in the tier now", labels=["tier"]
            ),
            "tierkv_tier_capacity_blocks": GaugeMetricFamily(
                "tierkv_tier_capacity_blocks", "The tier's capacity in blocks", labels=["tier"]
            ),
            "tierkv_tier_hits": CounterMetricFamily(
                "tierkv_tier_hits", "Block lookups found in the tier", labels=["tier"]
            ),
            "tierkv_tier_misses": CounterMetricFamily(
                "tierkv_tier_misses", "Block lookups that passed through the tier to a lower one", labels=["tier"]
            ),
            "tierkv_tier_evictions": CounterMetricFamily(
                "tierkv_tier_evictions", "Blocks demoted out of the tier", labels=["tier"]
            ),
        }
        for name, t in tiers.items():
            families["tierkv_tier_used_blocks"].add_metric([name], t["used_blocks"])
            families["tierkv_tier_capacity_blocks"].add_metric([name], t["capacity_blocks"])
            families["tierkv_tier_hits"].add_metric([name], t["hits"])
            families["tierkv_tier_misses"].add_metric([name], t["misses"])
            families["tierkv_tier_evictions"].add_metric([name], t["evictions_out"])
        moved = CounterMetricFamily("tierkv_link_bytes", "Bytes copied over each link between tiers", labels=["link"])
        for link, v in s["links"].items():
            moved.add_metric([link], v["bytes"])
        engine = s["engine"]
        yield from families.values()
        yield moved
        yield CounterMetricFamily(
            "tierkv_preemptions", "Begun sequences that gave up the GPU", value=engine["preemptions"]
        )
        yield CounterMetricFamily("tierkv_generated_tokens", "Tokens generated", value=engine["generated_tokens"])
        yield GaugeMetricFamily("tierkv_requests_running", "Sequences running", value=engine["running"])
        yield GaugeMetricFamily("tierkv_requests_waiting", "Requests waiting to start", value=engine["waiting"])
        prefix = s["prefix"]
        yield CounterMetricFamily(
            "tierkv_prefix_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            value=prefix["queried_tokens"],
        )
        yield CounterMetricFamily(
            "tierkv_prefix_hit_tokens", "Prompt tokens whose KV was reused", value=prefix["hit_tokens"]
        )
        by_tier = CounterMetricFamily(
            "tierkv_prefix_hit_tokens_by_tier",
            "Prompt tokens whose KV was reused, by the tier it was found in",
            labels=["tier"],
        )
        for tier, n in prefix["hit_tokens_by_tier"].items():
            by_tier.add_metric([tier], n)
        yield by_tier
        yield CounterMetricFamily(
            "tierkv_prefix_recomputed_by_choice_tokens",
            "Prompt tokens found in a lower tier but recomputed, the load-or-recompute choice judging that faster",
            value=prefix["recomputed_by_choice"],
        )
        if prefix.get("choice_prefill_tokens_per_s") is not None:
            yield GaugeMetricFamily(
                "tierkv_prefix_choice_prefill_tokens_per_second",
                "The prefill rate the load-or-recompute choice goes by",
                value=prefix["choice_prefill_tokens_per_s"],
            )
        links = GaugeMetricFamily(
            "tierkv_prefix_choice_link_bytes_per_second",
            "The link rates the load-or-recompute choice goes by",
            labels=["link"],
        )
        for link, rate in prefix.get("choice_link_bytes_per_s", {}).items():
            links.add_metric([link], rate)
        yield links


class Metrics:
    def __init__(self, stats) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        self.ttft = Histogram(
            "tierkv_time_to_first_token_seconds", "Arrival to first token", buckets=BUCKETS, registry=self.registry
        )
        self.tpot = Histogram(
            "tierkv_time_per_output_token_seconds", "Per token after the first", buckets=BUCKETS, registry=self.registry
        )
        self.e2e = Histogram(
            "tierkv_e2e_request_latency_seconds", "Arrival to the last token", buckets=BUCKETS, registry=self.registry
        )

    def observe(self, out) -> None:
        """A finished request's latencies (perf_counter seconds in its metrics)."""
        m = out.metrics
        if m.get("first_token_time") is None or m.get("finished_time") is None:
            return
        self.ttft.observe(m["first_token_time"] - m["arrival_time"])
        self.e2e.observe(m["finished_time"] - m["arrival_time"])
        n = max((len(c.token_ids) for c in out.outputs), default=0)
        if n > 1:
            self.tpot.observe((m["finished_time"] - m["first_token_time"]) / (n - 1))
