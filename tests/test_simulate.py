"""The simulator runner: a lost site stops a run that needs every site instead of hanging it (no NVFlare needed)."""

from __future__ import annotations

import logging
import sys
import time

import psutil
import pytest

from fedbrats.simulate import SimulatedSiteLostError, _run_simulator

LOST_LINE = "2026-11-22 08:59:18,063 - ERROR - Communication error with client site-12: [Errno 104] Connection reset"


def _fake_simulator(tmp_path, then_sleep: float) -> list[str]:
    """A stand-in for ``nvflare simulator`` that logs a lost site, then sleeps (a hung round) and exits 0."""
    script = tmp_path / "fake_simulator.py"
    script.write_text(f"import time\nprint({LOST_LINE!r}, flush=True)\ntime.sleep({then_sleep})\n")
    return [sys.executable, str(script)]


def test_lost_site_stops_a_run_that_needs_every_site(tmp_path) -> None:
    log = tmp_path / "simulator.log"
    started = time.monotonic()
    with pytest.raises(SimulatedSiteLostError, match="lost site site-12") as err:
        _run_simulator(_fake_simulator(tmp_path, 600), {}, str(log), str(tmp_path), stop_on_lost_site=True)
    assert err.value.site == "site-12"
    assert time.monotonic() - started < 60, "the hung run was not stopped"
    assert not [p for p in psutil.process_iter(["cmdline"]) if "fake_simulator.py" in " ".join(p.info["cmdline"] or [])]


def test_lost_site_is_only_a_warning_when_the_others_suffice(tmp_path, caplog) -> None:
    log = tmp_path / "simulator.log"
    with caplog.at_level(logging.WARNING, logger="fedbrats.simulate"):
        code = _run_simulator(_fake_simulator(tmp_path, 0.5), {}, str(log), str(tmp_path), stop_on_lost_site=False)
    assert code == 0
    assert "lost site site-12" in caplog.text
    assert LOST_LINE in log.read_text(encoding="utf-8"), "the simulator's output still goes to its log"
