"""Label-free estimates: temperature scaling, ATC-TS, what each interval is, and the order in which
the estimators are listed (rise_edge.site.estimates, the site part of bench's report, and the
statistics of benchmarks/site_estimates.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rise_edge.bench.report import site_lines
from rise_edge.errors import UserError
from rise_edge.site import estimates
from rise_edge.site.estimates import (Calibration, Measured, atc, estimate_accuracy,
                                      fit_temperature, measured_order, negative_entropy, softmax)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _drawn(rng: np.random.Generator, n: int, classes: int = 5, scale: float = 2.0
           ) -> tuple[np.ndarray, np.ndarray]:
    """(n, classes) calibrated logits and labels drawn from their softmax."""
    logits = rng.normal(0.0, scale, (n, classes))
    p = softmax(logits)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, np.minimum(labels, classes - 1)


# ---------------------------------------------------------------------------------------------------
# Temperature scaling


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    logits, labels = _drawn(np.random.default_rng(0), 4000)
    over = fit_temperature(logits * 3.0, labels)  # three times over-confident
    assert over.fitted and over.reason == ""
    assert over.temperature == pytest.approx(3.0, rel=0.08)
    assert over.nll < over.nll_at_1
    calibrated = fit_temperature(logits, labels)
    assert calibrated.temperature == pytest.approx(1.0, rel=0.08)
    under = fit_temperature(logits / 2.0, labels)
    assert under.temperature == pytest.approx(0.5, rel=0.08)


@pytest.mark.parametrize("logits, labels, why", [
    (np.eye(3)[np.arange(30) % 3] * 5, np.arange(30) % 3, "right on every source validation image"),
    (np.zeros((10, 1)), np.zeros(10, int), "fewer than two classes"),
    (np.full((10, 3), np.nan), np.zeros(10, int), "non-finite"),
    (np.ones((10, 3)), np.arange(10) % 3, "equal across classes"),
    (np.zeros((0, 3)), np.zeros(0, int), "no source validation images"),
])
def test_degenerate_sources_keep_t_1_and_say_why(logits: np.ndarray, labels: np.ndarray,
                                                 why: str) -> None:
    fit = fit_temperature(logits, labels)
    assert not fit.fitted and fit.temperature == 1.0 and why in fit.reason
    record = fit.to_record()
    assert record["temperature_fallback"] == fit.reason and record["temperature_fitted"] is False


def test_mismatched_logits_and_labels_are_a_user_error() -> None:
    with pytest.raises(UserError, match="do not match"):
        fit_temperature(np.zeros((4, 3)), np.zeros(5, int))
    with pytest.raises(UserError, match="outside"):
        fit_temperature(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0, 2]))


# ---------------------------------------------------------------------------------------------------
# ATC-TS


def _by_method(found: list[dict]) -> dict[str, dict]:
    return {e["method"]: e for e in found}


def test_atc_ts_gives_the_hand_computed_answer() -> None:
    # Two classes: the negative entropy falls with the margin |z0 - z1| / T whatever T is, so the
    # answer does not depend on the temperature and can be counted by hand. Source margins 1..8,
    # wrong on margins 1 and 2 (error 0.25): the threshold is margin 2's score. Site margins 0.5,
    # 1, 2, 3: two of four reach it.
    source = np.column_stack([np.arange(1.0, 9.0), np.zeros(8)])
    labels = np.array([1, 1] + [0] * 6)
    site = np.column_stack([np.array([0.5, 1.0, 2.0, 3.0]), np.zeros(4)])
    calibration = Calibration.from_logits(source, labels, ["a"] * 8)
    assert calibration.temperature.fitted
    found = _by_method(estimate_accuracy(calibration, site))
    assert found["ATC-TS"]["estimate"] == 50.0 and found["ATC"]["estimate"] == 50.0
    t = found["ATC-TS"]["temperature"]
    expected = negative_entropy(source[1:2] / calibration.temperature.temperature)[0]
    assert t == pytest.approx(calibration.temperature.temperature, abs=1e-4)
    assert found["ATC-TS"]["threshold"] == pytest.approx(expected, abs=1e-6)


def test_atc_ts_on_a_site_like_the_sources_gives_their_accuracy() -> None:
    # An over-confident model (logits x 3) on a site drawn from the sources' own distribution: the
    # site's true accuracy is the source accuracy up to sampling noise, and ATC-TS finds it.
    rng = np.random.default_rng(1)
    source, labels = _drawn(rng, 3000)
    site, site_labels = _drawn(rng, 3000)
    calibration = Calibration.from_logits(source * 3, labels, ["a"] * 3000)
    truth = 100 * float(np.mean(site.argmax(axis=1) == site_labels))
    entry = _by_method(estimate_accuracy(calibration, site * 3))["ATC-TS"]
    assert entry["temperature_fitted"] and entry["temperature"] == pytest.approx(3.0, rel=0.1)
    assert entry["estimate"] == pytest.approx(truth, abs=3.0)
    low, high = entry["interval"]
    assert low <= entry["estimate"] <= high


def test_atc_ts_with_no_temperature_is_atc_and_says_why() -> None:
    source = np.eye(3)[np.arange(60) % 3] * 4  # right on every image: no temperature fits
    site = np.column_stack([np.linspace(0.1, 4, 40), np.zeros(40), np.zeros(40)])
    calibration = Calibration.from_logits(source, np.arange(60) % 3, ["a"] * 60)
    found = _by_method(estimate_accuracy(calibration, site))
    entry = found["ATC-TS"]
    assert entry["temperature"] == 1.0 and entry["temperature_fitted"] is False
    assert "right on every source validation image" in entry["temperature_fallback"]
    assert "no temperature fit" in entry["how"]
    assert entry["estimate"] == found["ATC"]["estimate"]
    assert atc(calibration.negative_entropy, calibration.correct, negative_entropy(site)) * 100 == \
        pytest.approx(entry["estimate"], abs=0.01)


# ---------------------------------------------------------------------------------------------------
# What the intervals are, and the order


def _estimates_with_teacher() -> list[dict]:
    rng = np.random.default_rng(2)
    source, labels = _drawn(rng, 300, classes=3)
    site = rng.normal(0, 2, (100, 3))
    teacher = {"site_predictions": site.argmax(axis=1), "source_error": 0.05}
    return estimate_accuracy(Calibration.from_logits(source, labels, ["a"] * 300), site,
                             teacher=teacher)


def test_every_estimate_says_what_its_interval_is_and_its_measured_error() -> None:
    found = _by_method(_estimates_with_teacher())
    assert set(found) == {"ATC", "ATC-TS", "DoC", "teacher agreement"}
    for method, entry in found.items():
        kind = "bound" if method == "teacher agreement" else "spread"
        assert entry["interval_kind"] == kind
        assert entry["interval_meaning"] == estimates.INTERVAL_KINDS[kind]
        measured = entry["measured"]
        if method in estimates.MEASURED:
            assert measured["record"] == estimates.MEASURED_RECORD and measured["cases"] > 0
        else:
            assert measured is None
    assert "not the estimator's error" in estimates.INTERVAL_KINDS["spread"]


def test_the_order_follows_the_stored_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # As recorded (whatever MEASURED holds now): the lowest error first, the unmeasured last.
    listed = [e["method"] for e in _estimates_with_teacher()]
    basis = estimates.order_basis(listed)
    assert listed == [*basis["mean_abs_error"], *basis["not_measured"]]
    assert list(basis["mean_abs_error"].values()) == sorted(basis["mean_abs_error"].values())
    # Compared on the groups every one was measured on: b is better on "x", worse pooled.
    monkeypatch.setattr(estimates, "MEASURED", {
        "ATC": {"x": Measured(10, 5.0, 9.0, 5)},
        "DoC": {"x": Measured(10, 3.0, 9.0, 5), "y": Measured(10, 9.0, 20.0, 5)},
        "ATC-TS": {"x": Measured(10, 1.0, 2.0, 10)}})
    assert measured_order(["ATC", "DoC", "ATC-TS", "other"]) == ["ATC-TS", "DoC", "ATC", "other"]
    assert measured_order(["DoC", "other", "ATC"]) == ["DoC", "ATC", "other"]
    found = _estimates_with_teacher()
    assert [e["method"] for e in found] == ["ATC-TS", "DoC", "ATC", "teacher agreement"]


def test_bench_prints_each_interval_as_what_it_is() -> None:
    found = _estimates_with_teacher()
    data = {"site": {"folder": "site", "images": 100},
            "rows": [{"engine": "onnx-fp32", "site": {
                "estimates": found, "shift": {"unlike_every_source": False},
                "estimates_order": estimates.order_basis([e["method"] for e in found])}}]}
    text = "\n".join(site_lines(data))
    assert "95 % interval" not in text
    assert "(spread " in text and "(bound " in text
    basis = estimates.order_basis([e["method"] for e in found])
    errors = ", ".join(f"{m} {v:.1f}" for m, v in basis["mean_abs_error"].items())
    assert f"on {' and '.join(basis['compared_on'])} (points): {errors}" in text


# ---------------------------------------------------------------------------------------------------
# The benchmark's statistics


def _benchmark(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its sibling `common`, as when run as a script
    spec = importlib.util.spec_from_file_location("site_estimates_bench",
                                                  BENCHMARKS / "site_estimates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_averages_tied_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _benchmark(monkeypatch)
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): rho = 4.5 / sqrt(4.5 * 5)
    assert bench.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert bench.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert bench.spearman([1, 1, 1], [1, 2, 3]) is None
    assert bench.half_width([1.0, -2.0, 3.0, 0.5], level=0.75) == 2.0
