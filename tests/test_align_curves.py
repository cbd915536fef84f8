"""The report's preference-training curves (tunelab.align.curves): built from the logged history only."""

from __future__ import annotations

import pytest

from tunelab.align import curves


def _result(seed: int, margins: list[float], stage: str | None = "dpo") -> dict:
    history = [{"step": 5, "loss": 2.0, "stage": "sft"}]  # an SFT stage logs no margin: not a curve
    for index, margin in enumerate(margins):
        event = {"step": 5 * (index + 1), "loss": 0.69, "rewards/margins": margin,
                 "rewards/accuracies": 0.5 + margin, "kl": -margin}
        history.append({**event, "stage": stage} if stage else event)
    return {"method_label": "lora (objective=dpo)", "seed": seed, "history": history}


def test_curves_average_seeds_per_step_and_label_each_stage():
    results = [_result(0, [0.0, 0.2]), _result(1, [0.1, 0.4]), {"method_label": "sft only", "history": [{"step": 1}]}]
    series = curves.series(results)
    assert list(series) == ["lora (objective=dpo) / dpo"]  # the SFT-only cell and the SFT stage draw nothing
    margins = series["lora (objective=dpo) / dpo"]["rewards/margins"]
    assert margins == [(5, pytest.approx(0.05)), (10, pytest.approx(0.3))]  # mean over the two seeds per step
    assert series["lora (objective=dpo) / dpo"]["kl"][-1][1] == pytest.approx(-0.3)
    section = curves.markdown_section(results)
    assert "| lora (objective=dpo) / dpo | 2 | 0.050 → 0.300 | 0.550 → 0.800 | -0.050 → -0.300 |" in section
    assert f"plots/{curves.PLOT}.png" in section
    png = curves.plots(results)[curves.PLOT]
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_no_margin_logged_means_no_section():
    assert curves.markdown_section([{"method_label": "x", "history": [{"step": 1, "loss": 1.0}]}]) == ""
    assert curves.plots([]) == {}


def test_kto_curves_leave_out_its_z0_logged_as_kl():
    """KTO logs its KL estimate z0 under "kl"; it is not log π − log π_ref, so it gets no curve."""
    result = {**_result(0, [0.1, 0.2], stage="pref"), "stages": [{"name": "pref", "objective": "kto"}]}
    keys = curves.series([result])["lora (objective=dpo) / pref"]
    assert "rewards/margins" in keys and "kl" not in keys
