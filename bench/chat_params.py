"""The main bench's parameters and the fake model's answer, reused by the benches that start the same upstream."""

from __future__ import annotations

from dataclasses import dataclass

from bench.arrivals import ARRIVALS, Arrivals

MODEL = "bench-model"
TENANT = "bench"
# A realistic customer-service answer (76 characters) with no lexicon word in it, so output
# moderation scans it in full and lets all of it through.
REPLY = ("您好！您的订单已于今天上午发货，预计两到三天送达。"
         "物流单号可以在“我的订单”页面查看；"
         "如果还有其他问题，请随时联系我们，祝您购物愉快。")


@dataclass(frozen=True, slots=True)
class BenchParams:
    concurrency: tuple[int, ...] = (10, 100)
    requests_per_user: int = 10
    rounds: int = 3
    warmup: int = 20
    """Requests per path before the first measured round (not reported)."""
    ttft_ms: float = 50.0
    chunks: int = 20
    interval_ms: float = 10.0
    timeout_s: float = 60.0
    reply: str = REPLY
    rates: tuple[float, ...] = (10.0, 20.0, 40.0, 60.0, 80.0)
    """Open loop: arrival rates (requests/s), each run on both paths after the closed-loop rounds."""
    open_s: float = 5.0
    """Open loop: seconds of arrivals per rate and path."""
    arrivals: Arrivals = "even"

    def __post_init__(self) -> None:
        if not self.concurrency and not self.rates:
            raise ValueError("--concurrency and --rates are both empty: nothing to measure")
        if self.concurrency and min(self.concurrency) < 1:
            raise ValueError(f"--concurrency needs positive integers, got {self.concurrency}")
        if self.rates and min(self.rates) <= 0:
            raise ValueError(f"--rates needs positive numbers, got {self.rates}")
        if not self.open_s > 0 or self.arrivals not in ARRIVALS:
            raise ValueError(f"--open-s must be > 0 and --arrivals one of {ARRIVALS}")
        for name in ("requests_per_user", "rounds", "chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.warmup < 0 or self.ttft_ms < 0 or self.interval_ms < 0:
            raise ValueError("--warmup, --ttft-ms and --interval-ms must be >= 0")


QUICK = BenchParams(requests_per_user=2, rounds=1, warmup=10, rates=(10.0, 40.0), open_s=3.0)
