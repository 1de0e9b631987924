"""The cross_encoder's custom metrics, exported on Triton's /metrics next to its own.

Kept apart from the model glue so the names and buckets are defined once. `pb_utils` is passed
in because it only exists inside a Triton Python-backend stub.
"""

from __future__ import annotations

# Micro-batch sizes in tokens: from a lone short pair up past the default 16384 budget.
TOKEN_BUCKETS = [64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


class ScoringMetrics:
    def __init__(self, pb_utils, labels: dict[str, str]):
        # Triton deletes a family's metrics when the family object is collected: keep them all.
        self._families = []
        self._pb_utils, self._labels = pb_utils, labels

        def family(name, description, kind):
            self._families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self._families[-1]

        counter, histogram = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        self.pairs = family("rerank_pairs_total", "(query, document) pairs scored", counter).Metric(labels=labels)
        self.tokens = family("rerank_tokens_total", "tokens scored (no padding)", counter).Metric(labels=labels)
        self.compute_seconds = family(
            "rerank_compute_seconds_total", "seconds spent in encoder forwards", counter
        ).Metric(labels=labels)
        self.batch_tokens = family(
            "rerank_micro_batch_tokens", "tokens per encoder forward (micro-batch)", histogram
        ).Metric(labels=labels, buckets=TOKEN_BUCKETS)

    def describe_encoder(self, engine: str, dtype: str, device: str, quantize: str = "none") -> None:
        """rerank_encoder_info{engine, dtype, quantize, device} 1: what this instance runs, for dashboards
        and for telling which precision dtype=auto chose."""
        family = self._pb_utils.MetricFamily(name="rerank_encoder_info", description="the encoder an instance runs "
                                             "(value 1)", kind=self._pb_utils.MetricFamily.GAUGE)
        self._families.append(family)
        family.Metric(labels={**self._labels, "engine": engine, "dtype": dtype, "quantize": quantize,
                                     "device": device}).set(1)

    def observe_micro_batch(self, tokens: int, seconds: float) -> None:
        self.tokens.increment(tokens)
        self.compute_seconds.increment(seconds)
        self.batch_tokens.observe(tokens)

    def observe_pairs(self, pairs: int) -> None:
        self.pairs.increment(pairs)
