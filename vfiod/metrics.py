"""Prometheus text exposition (format 0.0.4) without a dependency: families of samples.

The daemon builds a fresh snapshot on every scrape from the counters its objects keep; nothing
here is global state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


@dataclass
class Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: list[tuple[str, dict[str, object], float]] = field(default_factory=list)

    def add(self, value: float, **labels: object) -> None:
        self.samples.append((self.name, labels, value))

    def add_histogram(
        self, buckets: Sequence[float], counts: Sequence[int], total: float, **labels: object
    ) -> None:
        """``counts[i]`` observations fell at or below ``buckets[i]`` (not cumulative yet)."""
        running = 0
        for bound, count in zip(buckets, counts, strict=False):
            running += count
            self.samples.append((f"{self.name}_bucket", {**labels, "le": f"{bound:g}"}, running))
        running += sum(counts[len(buckets):])
        self.samples.append((f"{self.name}_bucket", {**labels, "le": "+Inf"}, running))
        self.samples.append((f"{self.name}_sum", labels, total))
        self.samples.append((f"{self.name}_count", labels, running))

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for name, labels, value in self.samples:
            text = repr(float(value)) if isinstance(value, float) else str(value)
            lines.append(f"{name}{_labels(labels)} {text}")
        return "\n".join(lines)


def render(families: Iterable[Family]) -> str:
    return "\n".join(f.render() for f in families) + "\n"


class Histogram:
    """Fixed-bucket latency histogram (seconds), cheap enough to observe every message."""

    BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds
