"""bench.side_by_side: sides named right or refused, and a real run of two stacks at once reports both."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.side_by_side import Side, main
from devtools.devstack.stack import REPO_ROOT


def test_a_side_is_a_checkout_and_its_settings(tmp_path: Path) -> None:
    side = Side.parse("B", f"{REPO_ROOT},KEFU_STREAM_WINDOW_MS=0,KEFU_UVLOOP=0")
    assert side.env == {"KEFU_STREAM_WINDOW_MS": "0", "KEFU_UVLOOP": "0"}
    assert side.name == f"{REPO_ROOT},KEFU_STREAM_WINDOW_MS=0,KEFU_UVLOOP=0"
    with pytest.raises(ValueError, match="not a kefu checkout"):
        Side.parse("A", str(tmp_path))
    with pytest.raises(ValueError, match="KEFU_NAME=VALUE"):
        Side.parse("A", f"{REPO_ROOT},PATH=/bin")


def test_a_bad_side_is_one_line_of_usage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), str(REPO_ROOT)])
    assert stopped.value.code == 2 and "not a kefu checkout" in capsys.readouterr().err


def test_two_stacks_at_once_report_each_process_per_side(capsys: pytest.CaptureFixture[str]) -> None:
    main([str(REPO_ROOT), f"{REPO_ROOT},KEFU_STREAM_WINDOW_MS=0", "--users", "2", "--turns", "3", "--rounds", "1"])
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip().split(":")[0]: line.split("|")[2:-1]
            for line in table.splitlines() if line.startswith("| A:") or line.startswith("| B")}
    assert set(rows) == {"A", "B", "B - A"}, table
    header = [cell.strip() for cell in table.splitlines()[2].split("|")[2:-1]]
    assert header[:1] == ["session"] and "nats" in header and header[-3:] == ["kefu total", "TTFT p50", "failed"]
    for side in ("A", "B"):
        figures = dict(zip(header, (float(cell) for cell in rows[side]), strict=True))
        assert figures["failed"] == 0 and figures["kefu total"] > 0 and figures["TTFT p50"] > 0, table
        assert figures["kefu total"] == pytest.approx(sum(figures[p] for p in header[:-3]), abs=0.05)
