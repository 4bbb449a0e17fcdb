"""benchmarks/bf16_conv3d.py: the rate of non-finite weight gradients, and its command line."""

from __future__ import annotations

import json

import pytest
from torch import nn

from benchmarks.bf16_conv3d import main, nonfinite_rate


def test_a_deep_input_has_finite_gradients() -> None:
    assert nonfinite_rate(lambda: nn.Conv3d(4, 4, 3, padding=1), (4, 4, 4, 4), trials=5) == 0.0


def test_guarded_run_writes_zero_rates_and_refuses_an_existing_file(tmp_path) -> None:
    out = tmp_path / "guarded.json"
    assert main(["--trials", "3", "--guard", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["guard"] and set(result["nonfinite_rate"].values()) == {0.0}
    with pytest.raises(SystemExit):
        main(["--trials", "3", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--trials", "0", "--out", str(tmp_path / "other.json")])
