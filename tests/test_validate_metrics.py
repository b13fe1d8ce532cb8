"""Specs for validate.py's generic parts: metrics, compare, tolerance bands, agreement and input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from mlxd_daemon.errors import InvalidArgument, NotFound
from mlxd_daemon.validate import (
    REL_EPS_FRACTION,
    TOLERANCES,
    Tolerance,
    band_name,
    compare,
    matching_agreement,
    metrics,
    tolerance_for,
    validate_model,
)


class TestMetrics:
    def test_identical_arrays(self) -> None:
        """Identical arrays have zero error and cosine 1."""
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert metrics(a, a) == {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0, "nmse": 0.0}

    def test_known_difference(self) -> None:
        """max_abs, max_rel, nmse and cosine equal their hand-computed values."""
        ref = np.array([3.0, 4.0])
        cand = np.array([3.0, 4.5])
        m = metrics(ref, cand)
        eps = REL_EPS_FRACTION * math.sqrt((9 + 16) / 2)
        assert m["max_abs"] == pytest.approx(0.5)
        assert m["max_rel"] == pytest.approx(0.5 / (4.0 + eps))
        assert m["nmse"] == pytest.approx(0.25 / 25)
        assert m["cosine"] == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))

    def test_relative_error_floor(self) -> None:
        """A zero reference element is divided by eps (0.1% of the RMS), not by zero."""
        m = metrics(np.array([0.0, 10.0]), np.array([1e-3, 10.0]))
        assert m["max_rel"] == pytest.approx(1e-3 / (REL_EPS_FRACTION * math.sqrt(50)))

    def test_opposite_vectors(self) -> None:
        """A sign flip gives cosine -1."""
        assert metrics(np.ones(4), -np.ones(4))["cosine"] == pytest.approx(-1.0)

    def test_empty_and_zero(self) -> None:
        """Empty arrays are a perfect match; an all-zero reference falls back to MSE."""
        assert metrics(np.zeros((0, 3)), np.zeros((0, 3)))["cosine"] == 1.0
        m = metrics(np.zeros(4), np.full(4, 0.5))
        assert (m["nmse"], m["cosine"]) == (0.25, 0.0)


class TestCompare:
    TOL: ClassVar[dict[str, Tolerance]] = {"*": Tolerance(atol=1e-3, rtol=0.0, min_cosine=0.999)}

    def test_within_tolerance_passes(self) -> None:
        """Differences below atol pass."""
        ref = {"x": np.linspace(-1, 1, 10)}
        [report] = compare(ref, {"x": ref["x"] + 5e-4}, self.TOL)
        assert report.passed and report.max_abs == pytest.approx(5e-4)

    def test_beyond_tolerance_fails(self) -> None:
        """One element past atol fails the output."""
        ref = np.linspace(-1, 1, 10)
        cand = ref.copy()
        cand[3] += 2e-3
        assert [r.passed for r in compare({"x": ref}, {"x": cand}, self.TOL)] == [False]

    def test_cosine_gate(self) -> None:
        """A tiny-norm output that is within atol but points elsewhere fails on cosine."""
        ref = np.array([1e-4, 0.0])
        [report] = compare({"x": ref}, {"x": np.array([0.0, 1e-4])}, self.TOL)
        assert report.max_abs <= 1e-3 and report.cosine == pytest.approx(0.0) and not report.passed

    def test_structure_before_numerics(self) -> None:
        """A missing output or a shape mismatch fails with a note, in the reference's order."""
        ref = {"a": np.zeros(3), "b": np.zeros(3)}
        reports = compare(ref, {"b": np.zeros(4)}, self.TOL)
        assert [(r.name, r.passed) for r in reports] == [("a", False), ("b", False)]
        assert "missing" in reports[0].note and "shape" in reports[1].note
        assert reports[0].to_dict()["max_abs"] is None

    def test_non_finite_fails(self) -> None:
        """NaN in the candidate fails."""
        [report] = compare({"x": np.ones(3)}, {"x": np.array([1.0, np.nan, 1.0])}, self.TOL)
        assert not report.passed and "non-finite" in report.note

    def test_report_is_json_able(self) -> None:
        """to_dict gives plain JSON types with the tolerance alongside the metrics."""
        [report] = compare({"x": np.ones(3)}, {"x": np.ones(3)}, self.TOL)
        d = json.loads(json.dumps(report.to_dict()))
        assert {"name", "max_abs", "max_rel", "cosine", "nmse", "atol", "rtol", "passed"} <= set(d)


class TestMatchingAgreement:
    def test_fraction_of_same_best_text(self) -> None:
        """Agreement is the share of rows whose argmax column matches."""
        ref = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
        cand = np.array([[1.0, 0.5], [1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
        assert matching_agreement(ref, cand) == 0.75

    def test_empty_is_not_measured(self) -> None:
        """No images (or no texts): nothing was matched, so there is no agreement to report (None)."""
        assert matching_agreement(np.zeros((0, 3)), np.zeros((0, 3))) is None

    def test_non_finite_is_not_measured(self) -> None:
        """A row holding NaN has no meaningful best column: None, not a number."""
        ref = np.array([[1.0, 0.0], [0.0, 1.0]])
        assert matching_agreement(ref, np.array([[np.nan, 0.0], [0.0, 1.0]])) is None

    def test_shape_mismatch(self) -> None:
        """Different shapes are InvalidArgument."""
        with pytest.raises(InvalidArgument):
            matching_agreement(np.zeros((2, 3)), np.zeros((3, 2)))


class TestTolerances:
    def test_float32_embeddings(self) -> None:
        """float32 storage holds embeddings to atol 1e-4."""
        assert tolerance_for("text_embeds", TOLERANCES["float32"]).atol == 1e-4

    def test_bands_loosen_with_precision(self) -> None:
        """Each step down in precision has a looser embedding atol and a lower cosine floor."""
        order = ["float32", "float16", "bfloat16", "q8", "q6", "q4", "q3"]
        emb = [TOLERANCES[b]["embeds"] for b in order]
        assert [t.atol for t in emb] == sorted(t.atol for t in emb)
        assert [t.min_cosine for t in emb] == sorted((t.min_cosine for t in emb), reverse=True)

    def test_band_name(self) -> None:
        """Bits pick a quantized band; source dtype == stored dtype means identical weights (float32 band)."""
        assert band_name("float16") == "float16"
        assert band_name("bfloat16", source_dtype="bfloat16") == "float32"
        assert band_name("float16", bits=8) == "q8"
        assert band_name("float16", bits=4) == "q4"
        assert band_name("float16", bits=6) == "q6"
        assert band_name("float16", bits=2) == "q3"

    def test_unknown_dtype(self) -> None:
        """An unknown stored dtype is InvalidArgument."""
        with pytest.raises(InvalidArgument):
            band_name("int8")

    def test_output_kinds(self) -> None:
        """Names map to logits, embeds or hidden tolerances."""
        band = TOLERANCES["float16"]
        assert tolerance_for("logits_per_image", band) is band["logits"]
        assert tolerance_for("image_embeds", band) is band["embeds"]
        assert tolerance_for("vision_last_hidden_state", band) is band["hidden"]


class TestValidateModelInputs:
    def test_missing_directory(self, tmp_path: Path) -> None:
        """A missing source or MLX directory is NotFound."""
        (tmp_path / "mlx").mkdir()
        (tmp_path / "mlx" / "config.json").write_text('{"model_type": "clip"}')
        with pytest.raises(NotFound):
            validate_model(tmp_path / "nope", tmp_path / "mlx")
        with pytest.raises(NotFound):
            validate_model(tmp_path / "mlx", tmp_path / "nope")

    def test_model_type_mismatch(self, tmp_path: Path) -> None:
        """Source and MLX model_type must agree."""
        for name, model_type in (("src", "bert"), ("mlx", "clip")):
            (tmp_path / name).mkdir()
            (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(InvalidArgument) as e:
            validate_model(tmp_path / "src", tmp_path / "mlx")
        assert e.value.reason == "MODEL_TYPE_MISMATCH"
