"""One file is enough to extend fidmed: an extractor and a metric registered from this test module alone run end to
end through `fidmed evaluate` and `run.py`'s job (the toy preparer and augmentation have their own end-to-end tests
in test_prepare_cli.py and test_augment.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fidmed.features.base import Extractor, seeded_init_
from fidmed.features.registry import EXTRACTORS, ExtractorInfo
from fidmed.metrics.base import METRICS, MetricInputs, MetricValue, register_metric

from helpers.images import png_folder


class MeanColour(Extractor):
    """Per-channel mean and standard deviation of the (resized) image: a 6-d feature, no weights."""

    def __init__(self, setup, weights_path: Path | None) -> None:
        super().__init__(setup, weights_path)
        self.scale = torch.nn.Linear(6, 6, bias=False)
        seeded_init_(self.scale, setup.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        flat = x.flatten(2) / 255.0
        return self.scale(torch.cat([flat.mean(-1), flat.std(-1)], dim=1))


@dataclass
class MeanGapConfig:
    """``eval.mean_gap``: the toy metric's one option."""

    power: int = 2


def mean_gap(inputs: MetricInputs) -> list[MetricValue]:
    """|mu_g - mu_r|^power, from the moments every metric gets."""
    gap = float(np.abs(inputs.gen.mean - inputs.real.mean).sum() ** inputs.options.power)
    return [MetricValue("mean_gap", gap, {"power": inputs.options.power}, {"toy_protocol": True})]


@pytest.fixture
def toy_members():
    EXTRACTORS.add(
        "mean_colour",
        MeanColour,
        info=ExtractorInfo(
            study_name="MeanColour",
            feature_dim=6,
            input_size=16,
            resizer="clean",
            weights=None,
            network="per-channel mean/std",
            description="test-only",
        ),
    )
    register_metric(
        "mean_gap", columns={"mean_gap": "GAP"}, config=MeanGapConfig, summary="test-only: |mu_g - mu_r|^power"
    )(mean_gap)
    yield
    EXTRACTORS.remove("mean_colour")
    METRICS.remove("mean_gap")


def test_a_registered_extractor_and_metric_run_through_fidmed_evaluate(toy_members, tmp_path, capsys):
    from fidmed.cli import main

    gen, real = png_folder(tmp_path / "gen", 6, 1), png_folder(tmp_path / "real", 8, 2)
    out = tmp_path / "res.json"
    assert (
        main(
            [
                "evaluate",
                str(gen),
                str(real),
                "--extractor",
                "mean_colour",
                "--metrics",
                "fd",
                "mean_gap",
                "--set",
                "mean_gap.power=3",
                "--weights",
                "random",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "GAP" in table and "mean_colour [RANDOM-INIT]" in table  # the results table read the registry
    records = json.loads(out.read_text())["results"]
    gap = next(r for r in records if r["metric"] == "mean_gap")
    assert gap["details"]["power"] == 3 and gap["protocol"]["toy_protocol"] and gap["protocol"]["feature_dim"] == 6
    fd = next(r for r in records if r["metric"] == "fd")
    assert fd["value"] > 0 and fd["protocol"]["extractor"] == "mean_colour"


def test_a_registered_extractor_and_metric_run_through_the_run_py_job(toy_members, tmp_path):
    from fidmed.config import compose_config
    from fidmed.job import run_job

    cfg = compose_config(
        [
            "experiment=smoke",
            "extractor=[mean_colour]",
            "eval.metrics=[fd,mean_gap]",
            f"paths.root={tmp_path}",
            "schedule.kimg=0.016",
            "schedule.checkpoint_kimg=0.016",
        ]
    )
    assert cfg.extractor.mean_colour.input_size == 16 and cfg.eval.mean_gap.power == 2  # nodes from the registries
    payload = run_job(cfg, tmp_path / "run")
    metrics = {r["metric"]: r for r in payload["results"]}
    assert set(metrics) == {"fd", "mean_gap"} and metrics["mean_gap"]["details"]["power"] == 2
    assert (tmp_path / "run" / "results.json").is_file()
