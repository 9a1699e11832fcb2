"""The benchmark trace generator and the density benchmark's pure summary, as tables."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from bench import trace as tr
from bench.density import (
    DensityConfig,
    Outcome,
    RequestResult,
    classify_status,
    histogram_quantiles,
    markdown_table,
    parse_mix,
    percentile,
    standby_memory_report,
    summarise,
)
from snapwake.config import ConfigError, load
from snapwake.errors import InvalidArgument

BASE = tr.TraceParams(n_models=10, duration_s=600.0, rate=5.0, burstiness=4.0, seed=7)


def test_same_seed_same_trace_and_other_seed_differs() -> None:
    a, b = tr.generate(BASE), tr.generate(BASE)
    assert a == b and len(a) > 0
    assert tr.generate(dataclasses.replace(BASE, seed=8)) != a


@pytest.mark.parametrize("burstiness", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("zipf_s", [0.0, 1.0])
def test_mean_rate_is_kept(burstiness: float, zipf_s: float) -> None:
    p = dataclasses.replace(BASE, duration_s=4000.0, burstiness=burstiness, zipf_s=zipf_s)
    events = tr.generate(p)
    assert len(events) / p.duration_s == pytest.approx(p.rate, rel=0.12)


def test_events_are_sorted_in_range_and_within_limits() -> None:
    events = tr.generate(BASE)
    assert events == sorted(events)
    for e in events:
        assert 0 <= e.t_offset_s < BASE.duration_s
        assert 0 <= e.model_index < BASE.n_models
        assert BASE.prompt_len[0] <= e.prompt_len <= BASE.prompt_len[1]
        assert BASE.max_tokens[0] <= e.max_tokens <= BASE.max_tokens[1]


def _gaps_cv(events: list[tr.Event], model: int) -> float:
    times = [e.t_offset_s for e in events if e.model_index == model]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.pstdev(gaps) / statistics.mean(gaps)


@pytest.mark.parametrize(("burstiness", "low", "high"), [(1.0, 0.85, 1.15), (8.0, 1.5, 10.0)])
def test_burstiness_shapes_the_gaps(burstiness: float, low: float, high: float) -> None:
    # Poisson gaps have a coefficient of variation of 1; on/off bursts make it clearly larger.
    p = dataclasses.replace(BASE, duration_s=3000.0, burstiness=burstiness, zipf_s=0.0)
    assert low <= _gaps_cv(tr.generate(p), 0) <= high


def test_zipf_popularity_skew() -> None:
    p = dataclasses.replace(BASE, duration_s=3000.0, burstiness=1.0)
    counts = tr.requests_per_model(tr.generate(p), p.n_models)
    assert counts[0] > 2 * counts[4] > 0
    assert counts[0] / sum(counts) == pytest.approx(tr.zipf_weights(10, 1.0)[0], rel=0.1)


@pytest.mark.parametrize(("n", "s", "first"), [(1, 1.0, 1.0), (4, 0.0, 0.25), (2, 1.0, 2 / 3)])
def test_zipf_weights(n: int, s: float, first: float) -> None:
    w = tr.zipf_weights(n, s)
    assert sum(w) == pytest.approx(1.0) and w[0] == pytest.approx(first)


@pytest.mark.parametrize(("field", "value"), [
    ("n_models", 0), ("duration_s", 0.0), ("rate", -1.0), ("burstiness", 0.5), ("mean_on_s", 0.0),
    ("zipf_s", -1.0), ("prompt_len", (5, 2)), ("max_tokens", (0, 4)),
])
def test_bad_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        tr.generate(dataclasses.replace(BASE, **{field: value}))
    assert err.value.field == field


def _ev(t: float, m: int) -> tr.Event:
    return tr.Event(t, m, 8, 8)


@pytest.mark.parametrize(("trace", "service", "gpus", "busy"), [
    ([], 1.0, 0, 0.0),
    ([_ev(0, 0), _ev(1, 0), _ev(2, 3)], 1.0, 2, (2 / 100 + 1 / 100) / 2),
    ([_ev(0, 0), _ev(1, 1)], [0.5, 2.0], 2, (0.5 / 100 + 2 / 100) / 2),
    ([_ev(i, 0) for i in range(50)], 10.0, 1, 1.0),  # saturated: capped at fully busy
])
def test_static_deployment(trace: list[tr.Event], service: float | list[float], gpus: int, busy: float) -> None:
    assert tr.static_gpus_needed(trace) == gpus
    assert tr.static_busy_fraction(trace, 100.0, service) == pytest.approx(busy)


@pytest.mark.parametrize(("status", "headers", "body", "outcome"), [
    (429, {"retry-after": "1"}, {"message": "full", "type": "rate_limit_error", "code": "queue_full"},
     Outcome.REJECTED),
    (503, {"retry-after": "2"}, {"message": "t", "type": "timeout_error"}, Outcome.UNAVAILABLE),
    (503, {}, {"message": "t", "type": "timeout_error"}, Outcome.ERROR),  # no Retry-After
    (429, {"retry-after": "1"}, "plain text", Outcome.ERROR),  # not an OpenAI body
    (500, {"retry-after": "1"}, {"message": "x", "type": "server_error"}, Outcome.ERROR),
    (404, {}, {"message": "x", "type": "not_found_error"}, Outcome.ERROR),
])
def test_classify_status(status: int, headers: dict[str, str], body: object, outcome: Outcome) -> None:
    assert classify_status(status, headers, body)[0] is outcome


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 50, None), ([3.0], 99, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([0.0, 10.0], 99, 9.9),
])
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    got = percentile(values, q)
    assert got == (pytest.approx(expected) if expected is not None else None)


def _ok(m: int, ttft: float, source: str = "", total: float = 1.0) -> RequestResult:
    return RequestResult(m, Outcome.OK, 200, ttft, total, source)


def test_summary_from_lease_headers() -> None:
    results = [_ok(0, 0.5, "cold_start", 2.0), _ok(0, 0.05, "warm"), _ok(1, 0.7, "cold_start", 2.0),
               _ok(1, 0.04, "warm"), RequestResult(2, Outcome.REJECTED, 429, detail="queue_full"),
               RequestResult(2, Outcome.LOST, detail="no answer in 5s")]
    trace = [_ev(i, r.model_index) for i, r in enumerate(results)]
    s = summarise(results, trace, 100.0)
    assert (s["requests"], s["served"], s["errors"], s["cold_starts"]) == (6, 4, 1, 2)
    assert s["outcomes"] == {"ok": 4, "429": 1, "503": 0, "error": 0, "lost": 1}
    assert s["cs_ttft_source"] == "header" and s["cs_ttft_p50_s"] == pytest.approx(0.6)
    assert s["warm_hit_rate"] == pytest.approx(0.5)
    assert s["static_gpus_needed"] == 3
    assert s["error_samples"] == ["no answer in 5s"]
    assert s["rejections_by_code"] == {"429 queue_full": 1}


def test_summary_falls_back_to_gateway_metrics() -> None:
    results = [_ok(0, 0.5), _ok(0, 0.1), _ok(0, 0.1), _ok(0, 0.1)]
    s = summarise(results, [_ev(0, 0)] * 4, 10.0, {"count": 1, "p50_s": 0.5, "p99_s": 0.5})
    assert (s["cs_ttft_source"], s["cold_starts"], s["cs_ttft_p99_s"]) == ("gateway_metrics", 1, 0.5)
    assert s["warm_hit_rate"] == pytest.approx(0.75)


METRICS = """\
# HELP snapwake_cold_start_ttft_seconds x
# TYPE snapwake_cold_start_ttft_seconds histogram
snapwake_cold_start_ttft_seconds_bucket{function="a",source="cold_start",le="0.1"} 0.0
snapwake_cold_start_ttft_seconds_bucket{function="a",source="cold_start",le="0.5"} 3.0
snapwake_cold_start_ttft_seconds_bucket{function="a",source="cold_start",le="1.0"} 3.0
snapwake_cold_start_ttft_seconds_bucket{function="a",source="cold_start",le="+Inf"} 3.0
snapwake_cold_start_ttft_seconds_bucket{function="b",source="cold_start",le="0.1"} 0.0
snapwake_cold_start_ttft_seconds_bucket{function="b",source="cold_start",le="0.5"} 0.0
snapwake_cold_start_ttft_seconds_bucket{function="b",source="cold_start",le="1.0"} 1.0
snapwake_cold_start_ttft_seconds_bucket{function="b",source="cold_start",le="+Inf"} 1.0
"""


@pytest.mark.parametrize(("text", "expected"), [
    (METRICS, {"count": 4, "p50_s": 0.5, "p99_s": 1.0}),
    ("", {"count": 0, "p50_s": None, "p99_s": None}),
])
def test_histogram_quantiles(text: str, expected: dict[str, object]) -> None:
    assert histogram_quantiles(text, "snapwake_cold_start_ttft_seconds") == expected


@pytest.mark.parametrize(("argv", "bad"), [
    (["--mode", "tpu"], "mode"), (["--rate", "0"], "rate"), (["--burstiness", "0.5"], "burstiness"),
    (["--gpu-mix", "huge:3"], "gpu_mix"), (["--concurrency", "0"], "concurrency"),
])
def test_config_names_bad_key(argv: list[str], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        load(DensityConfig, argv, env={})


def test_default_gpu_mix_is_thirty_plus_models() -> None:
    presets = parse_mix(load(DensityConfig, [], env={}).gpu_mix)
    assert len(presets) >= 30 and presets.count("4b") >= 1


def test_markdown_table_has_every_row() -> None:
    s = summarise([_ok(0, 0.5, "cold_start")], [_ev(0, 0)], 10.0)
    s.update(models=1, gpu_busy_fraction=None, standby_rss_bytes_median=300 * 2**20)
    table = markdown_table(s)
    assert "| CS-TTFT p99 (s) | 0.500 |" in table and "| standby host RSS per model (MiB, median) | 300.000 |" in table
    assert "| standby host PSS per model (MiB, median / max) | n/a / n/a |" in table


def test_standby_memory_is_reported_per_kind_with_median_and_max() -> None:
    mib = 2**20
    report = standby_memory_report({"rss": {"a": 1200 * mib, "b": 1300 * mib, "c": 2100 * mib},
                                    "pss": {"a": 300 * mib, "b": 400 * mib, "c": 1000 * mib},
                                    "private": {"a": 100 * mib, "b": 150 * mib, "c": 800 * mib}})
    assert report["standby_rss_bytes"]["c"] == 2100 * mib and report["standby_rss_bytes_median"] == 1300 * mib
    assert (report["standby_pss_bytes_median"], report["standby_pss_bytes_max"]) == (400 * mib, 1000 * mib)
    assert (report["standby_private_bytes_median"], report["standby_private_bytes_max"]) == (150 * mib, 800 * mib)
    s = summarise([_ok(0, 0.5, "cold_start")], [_ev(0, 0)], 10.0)
    s.update(models=3, gpu_busy_fraction=None, **report)
    table = markdown_table(s)
    assert "| standby host PSS per model (MiB, median / max) | 400.000 / 1000.000 |" in table
    assert "| standby host private per model (MiB, median / max) | 150.000 / 800.000 |" in table


def test_standby_memory_missing_kind_reads_none() -> None:
    report = standby_memory_report({"rss": {"a": 5}})
    assert report["standby_pss_bytes"] == {} and report["standby_pss_bytes_median"] is None
    assert report["standby_private_bytes_max"] is None and report["standby_rss_bytes_max"] == 5
