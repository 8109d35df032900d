"""The benches' rate verdicts: which open-loop rates pass, and the highest one that counts."""

from __future__ import annotations

from typing import Any

from bench.chat_report import Measured, highest_rate_within, open_loop_rows
from bench.loadgen import LoadResult, RequestResult, Summary
from bench.ws_report import highest_rate_within as ws_highest_rate_within
from bench.ws_report import rate_rows


def result(path: str, rate: float, ttft_p99_ms: float, failed: int = 0) -> LoadResult:
    ttft = Summary(10, 0.05, 0.05, 0.05, ttft_p99_ms / 1000, 0.05, ttft_p99_ms / 1000)
    samples = tuple(RequestResult(0, False, 0.1, error="http_503") for _ in range(failed))
    return LoadResult(path, "openai" if path == "direct" else "kefu", 3, 10 + failed, 10, failed,
                      {"http_503": failed} if failed else {}, 0, 1.0, 10.0, ttft, ttft, samples,
                      offered_rate=rate, start_lag=ttft, max_in_flight=3)


def test_open_loop_rate_passes_within_50_ms_of_direct_without_failures() -> None:
    measured = [Measured("direct", 0, result("direct", 10, 60), {"gateway": 0.0}),
                Measured("kefu", 0, result("kefu", 10, 105), {"gateway": 6.0, "session": 4.0}),
                Measured("kefu", 1, result("kefu", 20, 150), {}),
                Measured("direct", 1, result("direct", 20, 99), {}),
                Measured("direct", 2, result("direct", 40, 60), {}),
                Measured("kefu", 2, result("kefu", 40, 70, failed=1), {})]
    rows = open_loop_rows(measured)
    assert list(rows) == [10, 20, 40]
    assert rows[10]["ttft_p99_diff_ms"] == 45.0 and rows[10]["within"]
    assert rows[10]["kefu"]["cpu_ms_per_request"] == {"gateway": 6.0, "session": 4.0}
    assert rows[20]["ttft_p99_diff_ms"] == 51.0 and not rows[20]["within"]
    assert not rows[40]["within"]  # 10 ms over direct, but a request failed
    assert highest_rate_within(rows) == 10


def test_closed_loop_results_are_not_open_loop_rows() -> None:
    closed = LoadResult("kefu", "kefu", 10, 1, 1, 0, {}, 0, 1.0, 1.0, None, None)
    assert open_loop_rows([Measured("kefu", 0, closed, {})]) == {}


def ws_row(rate: float, p99: float | None, lost: int = 0) -> dict[str, Any]:
    return {"offered_rate": rate, "latency_ms": None if p99 is None else {"p50": 5.0, "p99": p99}, "lost": lost,
            "cpu_ms_per_message": {"gateway": 1.0}, "cpu_percent": {"gateway": 10}}


def test_ws_rates_include_the_main_rate_and_stop_at_the_first_failure() -> None:
    latency = {"kefu": ws_row(300, 45.0),
               "sweep": {"100": ws_row(100, 20.0), "200": ws_row(200, 49.0, lost=1), "50": ws_row(50, 10.0)}}
    assert list(rate_rows(latency)) == [50, 100, 200, 300]
    # 300 is within, but 200 lost a message: the highest that counts is 100.
    assert ws_highest_rate_within(latency) == 100
    assert ws_highest_rate_within({"kefu": ws_row(300, 45.0)}) == 300
    assert ws_highest_rate_within({"kefu": {"error": "RuntimeError: x"}}) is None
    assert ws_highest_rate_within({"sweep": {"100": {"error": "boom"}, "200": ws_row(200, 1.0)}}) is None


def test_open_loop_report_names_the_highest_rate_and_each_process_cpu() -> None:
    from bench.chat_report import open_loop_lines

    rows = open_loop_rows([Measured("direct", 0, result("direct", 10, 60), {"client": 1.0}),
                           Measured("kefu", 0, result("kefu", 10, 100), {"gateway": 6.5, "nats": 1.25})])
    report = {"parameters": {"arrivals": "even", "open_s": 5.0}, "open_loop_highest_rate": highest_rate_within(rows),
              "idle_cpu_ms_per_s": {"gateway": 4.0, "session": 2.0, "client": 0.5}}
    text = "\n".join(open_loop_lines(report, rows))
    assert "| 10 | kefu | 10 | 0 | 3 |" in text and "+40.0 (within)" in text
    assert "| 10 | kefu | – | – | 6.50 | – | – | – | 1.25 | 7.75 |" in text
    assert "(kefu 6.0)" in text
    assert "**10 requests/s** of 10." in text
