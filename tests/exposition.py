"""Reading a Prometheus text exposition back into numbers, for assertions."""

from __future__ import annotations

import math
import urllib.request
from typing import Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def value(text: str, metric: str, /, **labels: str) -> Optional[float]:
    """The value of the one sample called ``metric`` whose labels include ``labels``; None when absent."""
    matches = [v for sample_labels, v in samples(text).get(metric, [])
               if all(sample_labels.get(k) == want for k, want in labels.items())]
    if not matches:
        return None
    assert len(matches) == 1, f"{metric}{labels} matches {len(matches)} samples"
    return matches[0]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b
