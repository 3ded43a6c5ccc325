"""The load generator's pure parts: Poisson schedule, request mix, percentiles, SLO and
saturation logic, CSV shape; and the context switch count it reports per service. Nothing
here is timed."""

from __future__ import annotations

import csv
import math
import os
import threading
import time

import numpy as np
import pytest

from sluice.bench.load import (
    CSV_FIELDS,
    KIND_RECOMMEND,
    KIND_SEARCH,
    Records,
    deal,
    good_mask,
    make_requests,
    meets_budget,
    next_rate,
    percentile,
    poisson_schedule,
    proc_switches,
    saturation,
    slo_latency,
    step_rows,
    title_words,
    write_csv,
)


# -- schedule -------------------------------------------------------------------------------
def test_poisson_schedule_rate_and_gaps() -> None:
    rng = np.random.default_rng(0)
    rate, duration = 200.0, 100.0
    t = poisson_schedule(rate, duration, rng)
    assert np.all(np.diff(t) > 0)
    assert t[0] >= 0 and t[-1] < duration
    n = len(t)
    # count ~ Poisson(rate * duration): mean 20000, sd ~141; 5 sd band
    assert abs(n - rate * duration) < 5 * math.sqrt(rate * duration)
    gaps = np.diff(t)
    # exponential gaps: mean 1/rate and coefficient of variation 1 (a fixed-rate
    # schedule would have CV 0), P(gap > mean) = e^-1
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.01)


def test_poisson_counts_per_window_have_poisson_dispersion() -> None:
    rng = np.random.default_rng(1)
    t = poisson_schedule(50.0, 400.0, rng)
    counts = np.bincount((t // 1.0).astype(int), minlength=400)
    # variance / mean ~ 1 for Poisson counts
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)


def test_poisson_schedule_edge_cases_and_determinism() -> None:
    assert len(poisson_schedule(0.0, 10.0, np.random.default_rng(0))) == 0
    assert len(poisson_schedule(10.0, 0.0, np.random.default_rng(0))) == 0
    a = poisson_schedule(30.0, 5.0, np.random.default_rng(7))
    b = poisson_schedule(30.0, 5.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    # a long schedule needs more than the first chunk of gaps
    assert poisson_schedule(1.0, 500.0, np.random.default_rng(3))[-1] > 450


def test_deal_partitions_the_schedule() -> None:
    parts = deal(10, 3)
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert [len(p) for p in deal(2, 4)] == [1, 1, 0, 0]


# -- request mix ------------------------------------------------------------------------------
def test_make_requests_mix_and_queries_from_titles() -> None:
    titles = ["Acme Trail Running Shoes - Blue", "Zen Labs Espresso Grinder - 2 pack"]
    words = title_words(titles)
    assert words[0] == ["acme", "trail", "running", "shoes", "blue"]
    rng = np.random.default_rng(0)
    reqs = make_requests(4000, 0.3, ["u1", "u2", "u3"], words, rng)
    share = np.mean([r.kind == KIND_SEARCH for r in reqs])
    assert share == pytest.approx(0.3, abs=0.03)
    vocab = {w for ws in words for w in ws}
    for r in reqs:
        assert r.user_id in {"u1", "u2", "u3"}
        if r.kind == KIND_SEARCH:
            q = r.query.split()
            assert 1 <= len(q) <= 3
            assert set(q) <= vocab
            # consecutive words of one title
            assert any(" ".join(q) in " ".join(ws) for ws in words)
        else:
            assert r.kind == KIND_RECOMMEND and r.query == ""


def test_make_requests_all_recommend_without_titles() -> None:
    reqs = make_requests(50, 1.0, ["u"], [], np.random.default_rng(0))
    assert all(r.kind == KIND_RECOMMEND for r in reqs)


# -- statistics -------------------------------------------------------------------------------
def test_percentile_matches_numpy_and_handles_inf_and_empty() -> None:
    v = np.arange(1, 101, dtype=float)
    assert percentile(v, 50) == pytest.approx(np.percentile(v, 50))
    assert percentile(v, 99) == pytest.approx(np.percentile(v, 99))
    assert math.isnan(percentile(np.zeros(0), 99))
    w = v.copy()
    w[-1] = np.inf  # one failure in 100: p99 interpolates between 99 and inf
    assert math.isinf(percentile(w, 99.5))
    assert percentile(w, 50) == pytest.approx(50.5)
    w[-2:] = np.inf
    assert math.isinf(percentile(w, 99))


def _records(
    lat_ms: list[float],
    kind: int = KIND_RECOMMEND,
    code: list[int] | None = None,
    degraded: list[bool] | None = None,
    late_ms: float = 0.0,
) -> Records:
    n = len(lat_ms)
    intended = np.arange(n, dtype=float) * 0.01
    return Records(
        intended=intended,
        sent=intended + late_ms / 1000,
        done=intended + np.asarray(lat_ms) / 1000,
        kind=np.full(n, kind, np.int8),
        code=np.asarray(code if code is not None else [0] * n, np.int16),
        degraded=np.asarray(degraded if degraded is not None else [False] * n, bool),
        stage_us=np.tile(np.array([4000, 1000, 8000, 500]), (n, 1)),
        server_us=np.full(n, 15000),
    )


def test_slo_counts_errors_and_degraded_as_misses() -> None:
    rec = _records(
        [10.0] * 97 + [70.0, 10.0, 10.0], code=[0] * 98 + [14, 0], degraded=[False] * 99 + [True]
    )
    good = good_mask(rec, 0.050)
    assert good.sum() == 97  # one too slow, one UNAVAILABLE, one degraded
    lat = slo_latency(rec)
    assert np.isinf(lat).sum() == 2
    assert not meets_budget(rec, 0.050)
    # 1 miss in 100 is exactly the 99% allowance
    assert meets_budget(_records([10.0] * 99 + [80.0]), 0.050)
    assert not meets_budget(_records([10.0] * 98 + [80.0, 80.0]), 0.050)
    assert meets_budget(_records([]), 0.050)


def test_latency_is_measured_from_the_intended_time() -> None:
    # a client that sends 30 ms late and gets a 25 ms answer made the user wait 55 ms
    rec = _records([55.0] * 100, late_ms=30.0)
    assert rec.lateness_s == pytest.approx(np.full(100, 0.030))
    assert not meets_budget(rec, 0.050)


def test_saturation_is_the_last_meeting_rate_before_the_first_failure() -> None:
    assert saturation([10, 20, 30, 40], [True, True, False, False]) == (20.0, 30.0)
    # a lucky pass above the first failure does not count
    assert saturation([40, 10, 30, 20], [True, True, False, True]) == (20.0, 30.0)
    assert saturation([10, 20], [True, True]) == (20.0, math.inf)
    assert saturation([10, 20], [False, True]) == (0.0, 10.0)


def test_next_rate_steps_then_bisects() -> None:
    tested: dict[float, bool] = {}
    seq = []
    truth = 37.0  # meets while rate <= 37
    while (r := next_rate(tested, 10, 10, 100, refine=2, stop_after=1)) is not None:
        seq.append(r)
        tested[r] = r <= truth
    assert seq == [10, 20, 30, 40, 35.0, 37.5]
    assert saturation(sorted(tested), [tested[r] for r in sorted(tested)]) == (35.0, 37.5)


def test_next_rate_stops_at_max_and_continues_after_failures() -> None:
    tested = {10.0: True, 20.0: True}
    assert next_rate(tested, 10, 10, 20, refine=2) is None
    tested = {10.0: True, 20.0: False}
    assert next_rate(tested, 10, 10, 100, refine=0, stop_after=2) == 30.0
    tested[30.0] = False
    assert next_rate(tested, 10, 10, 100, refine=0, stop_after=2) is None
    # the first step already fails: bisect towards zero
    assert next_rate({10.0: False}, 10, 10, 100, refine=1) == 5.0


# -- step rows and CSV ---------------------------------------------------------------------
def _mixed() -> Records:
    rec = Records.concat(
        [
            _records([12.0] * 95 + [45.0] * 5, KIND_RECOMMEND),
            _records([20.0] * 90 + [90.0] * 10, KIND_SEARCH, code=[0] * 99 + [4]),
        ]
    )
    return rec.select(np.argsort(rec.intended, kind="stable"))


def test_step_rows_per_kind_and_all() -> None:
    rows = step_rows(
        _mixed(),
        tag="t",
        step=3,
        offered=20.0,
        window=(0.0, 1.0),
        budgets_ms={"recommend": 50.0, "search": 60.0},
        client_cpu_max=0.2,
    )
    by = {r["kind"]: r for r in rows}
    assert list(by) == ["recommend", "search", "all"]
    assert by["recommend"]["meets"] is True
    assert by["search"]["meets"] is False  # 10% over budget
    assert by["all"]["meets"] is False
    assert by["search"]["errors"] == 1
    assert by["search"]["errors_by_code"] == "DEADLINE_EXCEEDED:1"
    assert by["all"]["requests"] == 200
    assert by["recommend"]["p50_ms"] == pytest.approx(12.0)
    assert by["recommend"]["fine_p50_ms"] == pytest.approx(8.0)
    assert by["recommend"]["gateway_own_p50_ms"] == pytest.approx(1.5)
    assert by["recommend"]["transport_p50_ms"] == pytest.approx(12.0 - 15.0)
    assert math.isinf(by["search"]["p99_slo_ms"])
    assert by["all"]["client_ok"] is True
    for r in rows:
        assert set(r) == set(CSV_FIELDS)


def test_client_check_flags_late_or_busy_clients() -> None:
    late = _records([20.0] * 100, late_ms=12.0)
    rows = step_rows(
        late,
        tag="t",
        step=0,
        offered=10.0,
        window=(0.0, 1.0),
        budgets_ms={"recommend": 50.0},
        max_lateness_ms=5.0,
    )
    assert rows[-1]["client_ok"] is False
    busy = step_rows(
        _records([20.0] * 100),
        tag="t",
        step=0,
        offered=10.0,
        window=(0.0, 1.0),
        budgets_ms={"recommend": 50.0},
        client_cpu_max=0.95,
    )
    assert busy[-1]["client_ok"] is False


def test_csv_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = []
    for step, rate in enumerate((10.0, 20.0)):
        rows += step_rows(
            _mixed(),
            tag="t",
            step=step,
            offered=rate,
            window=(0.0, 1.0),
            budgets_ms={"recommend": 50.0, "search": 60.0},
        )
    path = tmp_path / "out" / "load.csv"
    write_csv(path, rows)
    with path.open() as f:
        data = list(csv.reader(f))
    assert data[0] == CSV_FIELDS
    assert len(data) == 1 + 2 * 3
    assert all(len(r) == len(CSV_FIELDS) for r in data)
    assert [r[CSV_FIELDS.index("kind")] for r in data[1:]] == ["recommend", "search", "all"] * 2


# -- compare helpers (pure) -----------------------------------------------------------------
def test_strip_block_removes_only_dynamic_batching() -> None:
    from pathlib import Path

    from sluice.bench.compare import strip_block

    root = Path(__file__).resolve().parents[2]
    text = (root / "model_repository" / "fine_ranker" / "config.pbtxt").read_text()
    out = strip_block(text, "dynamic_batching")
    assert "dynamic_batching" in text
    assert "dynamic_batching" not in out
    assert "max_queue_delay_microseconds" not in out
    for kept in ("max_batch_size: 64", "instance_group", "intra_op_thread_count", "output ["):
        assert kept in out
    assert out.count("{") == out.count("}")
    assert strip_block(out, "dynamic_batching") == out


def test_triton_metrics_parse_and_breakdown() -> None:
    from sluice.bench.compare import parse_triton_metrics, triton_breakdown

    def snapshot(n: float, execs: float, queue: float, infer: float) -> str:
        lab = '{model="fine_ranker",version="1"}'
        return "\n".join(
            [
                "# HELP nv_inference_count x",
                f"nv_inference_request_success{lab} {n}",
                f"nv_inference_count{lab} {n}",
                f"nv_inference_exec_count{lab} {execs}",
                f"nv_inference_request_duration_us{lab} {queue + infer}",
                f"nv_inference_queue_duration_us{lab} {queue}",
                f"nv_inference_compute_infer_duration_us{lab} {infer}",
                'nv_inference_count{model="other",version="1"} 999',
            ]
        )

    m0 = parse_triton_metrics(snapshot(10, 10, 1000, 5000))
    m1 = parse_triton_metrics(snapshot(110, 35, 21000, 105000))
    assert m0["nv_inference_count"] == 10
    b = triton_breakdown(m0, m1)
    assert b["requests"] == 100
    assert b["mean_batch"] == 4.0
    assert b["queue_us"] == 200.0
    assert b["compute_infer_us"] == 1000.0
    # 100 requests in 25 executions of 4; each request accrued its batch's 1 ms
    assert b["infer_busy_s"] == 0.025


def test_perf_analyzer_text_fallback() -> None:
    from sluice.bench.compare import parse_perf_analyzer_text

    unstable = (
        "Request concurrency: 1\n"
        "  Pass [1] throughput: 60 infer/sec. p99 latency: 50000 usec\n"
        "  Pass [2] throughput: 120 infer/sec. p99 latency: 20000 usec\n"
        "  Pass [3] throughput: 30 infer/sec. p99 latency: 90000 usec\n"
        "Failed to obtain stable measurement.\n"
    )
    got = parse_perf_analyzer_text(unstable)
    assert got == {"Inferences/Second": 60.0, "p99 latency": 50000.0}
    stable = (
        "  Client: \n    Request count: 615\n    Throughput: 56.8 infer/sec\n"
        "    p50 latency: 16524 usec\n    p90 latency: 24464 usec\n"
        "    p95 latency: 27887 usec\n    p99 latency: 36387 usec\n"
        "    Avg gRPC time: 17544 usec ((un)marshal request/response 12 usec)\n"
    )
    got = parse_perf_analyzer_text(stable)
    assert got["Inferences/Second"] == 56.8
    assert got["p50 latency"] == 16524 and got["p99 latency"] == 36387
    assert got["Avg latency"] == 17544
    assert parse_perf_analyzer_text("nothing") == {}


def test_hop_floor_prices_six_null_round_trips_against_the_local_median() -> None:
    from sluice.bench.compare import CASCADE_HOPS, hop_floor

    summary = {
        "table": [
            {"kind": "all", "variant": "local", "p50_ms": 6.0},
            {"kind": "all", "variant": "grpc_triton", "p50_ms": 15.0},
            {"kind": "search", "variant": "local", "p50_ms": 11.0},
        ]
    }
    floor = hop_floor([0.4, 0.5, 0.6, 0.5, 9.0], summary)
    assert CASCADE_HOPS == 6
    assert floor["p50_ms"] == 0.5
    assert floor["floor_ms"] == 3.0
    assert floor["floor_ratio"] == 1.5  # (6 + 3) / 6
    assert floor["p99_ms"] > 8.0


def test_context_switches_are_counted_over_every_thread_of_the_process() -> None:
    """A second thread that goes to sleep 50 times is 50 voluntary switches, and the process
    count includes them: the main thread sleeps only while it waits for that thread."""
    slept, done = threading.Event(), threading.Event()

    def worker() -> None:
        for _ in range(50):
            time.sleep(0.0005)  # the behaviour under test: a thread giving up its core
        slept.set()
        done.wait()  # alive when counted: /proc lists live threads only

    thread = threading.Thread(target=worker)
    before = proc_switches([os.getpid()])
    thread.start()
    slept.wait()
    after = proc_switches([os.getpid()])
    done.set()
    thread.join()
    assert after - before >= 50
    assert proc_switches([2**22 + 7]) == 0  # a process that is not there counts nothing
