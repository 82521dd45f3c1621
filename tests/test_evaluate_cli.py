"""`fidmed evaluate` folder vs folder (random-init extractor: plumbing only) against a direct Evaluator run."""

import argparse
import json

import pytest

from fidmed.evaluation.cli import add_evaluate_parser
from fidmed.features.registry import build_extractor

from helpers.images import png_folder


def _parser():
    p = argparse.ArgumentParser()
    add_evaluate_parser(p.add_subparsers(dest="command"))
    return p


@pytest.mark.slow  # ~30 s on 2 CPU cores: two random-init InceptionV3 builds and 299x299 forwards
def test_evaluate_folder_vs_folder(tmp_path, capsys):
    from fidmed.data.folder import ImageFolderDataset
    from fidmed.evaluation.evaluator import Evaluator
    from fidmed.evaluation.sources import DatasetSource

    gen, real = png_folder(tmp_path / "gen", 7, 1), png_folder(tmp_path / "real", 9, 2)
    out = tmp_path / "res.json"
    args = _parser().parse_args(
        [
            "evaluate",
            str(gen),
            str(real),
            "--extractor",
            "inception_tf",
            "--metrics",
            "fd",
            "rfd",
            "prdc",
            "--set",
            "prdc.k=2",
            "--weights",
            "random",
            "--device",
            "cpu",
            "--num-gen",
            "6",
            "--out",
            str(out),
            "--batch-size",
            "4",
        ]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "RANDOM-INIT" in text and "inception_tf" in text
    res = json.loads(out.read_text())["results"]
    metrics = [r["metric"] for r in res]
    assert metrics == ["fd", "rfd", "precision", "recall", "density", "coverage"]
    assert all(r["protocol"]["n_gen"] == 6 and r["protocol"]["n_real"] == 9 for r in res)
    assert res[2]["details"]["k"] == 2 and res[2]["protocol"]["forward_precision"] == "fp32"
    # the same numbers from the engine directly
    ex = [build_extractor({"name": "inception_tf", "weights_source": "random"}, allow_random=True)]
    ev = Evaluator(
        ex,
        DatasetSource(ImageFolderDataset(real)),
        device="cpu",
        metrics=["fd", "rfd", "prdc"],
        metric_options={"prdc": {"k": 2}},
    )
    direct = ev.evaluate(DatasetSource(ImageFolderDataset(gen), 6))
    assert [r["value"] for r in res] == pytest.approx([r.value for r in direct], rel=1e-9)


def test_evaluate_errors(tmp_path):
    from fidmed.errors import FidmedError

    gen, real = png_folder(tmp_path / "gen", 3, 1), png_folder(tmp_path / "real", 5, 2)
    args = _parser().parse_args(
        [
            "evaluate",
            str(gen),
            str(real),
            "--weights",
            "random",
            "--device",
            "cpu",
            "--num-gen",
            "4",
            "--extractor",
            "inception_tf",
        ]
    )
    with pytest.raises(FidmedError, match="4 images were requested .* holds only 3"):
        args.func(args)
    args = _parser().parse_args(["evaluate", str(gen), str(real), "--extractor", "nope"])
    with pytest.raises(FidmedError, match="unknown extractor"):
        args.func(args)
    args = _parser().parse_args(
        [
            "evaluate",
            str(tmp_path / "x.txt"),
            str(real),
            "--weights",
            "random",
            "--device",
            "cpu",
            "--extractor",
            "inception_tf",
        ]
    )
    with pytest.raises(FidmedError, match="x.txt does not exist"):
        args.func(args)
    (tmp_path / "x.txt").write_text("not images")
    with pytest.raises(FidmedError, match="neither a folder of images nor a generator file"):
        args.func(args)


def test_resizer_override_is_used_and_recorded(tmp_path):
    from fidmed.errors import ConfigError

    gen, real = png_folder(tmp_path / "gen", 4, 1), png_folder(tmp_path / "real", 5, 2)
    out = tmp_path / "res.json"
    args = _parser().parse_args(
        [
            "evaluate",
            str(gen),
            str(real),
            "--extractor",
            "resnet",
            "--weights",
            "random",
            "--device",
            "cpu",
            "--resizer",
            "torch_bilinear",
            "--out",
            str(out),
            "--num-workers",
            "2",
        ]
    )
    assert args.func(args) == 0
    res = json.loads(out.read_text())["results"]
    assert {r["protocol"]["resizer"] for r in res} == {"torch_bilinear"}
    default = build_extractor({"name": "resnet", "weights_source": "random"}, allow_random=True)
    assert default.preprocessing.resizer == "clean"  # the override did not leak into the registry's config
    args = _parser().parse_args(
        [
            "evaluate",
            str(gen),
            str(real),
            "--extractor",
            "resnet",
            "--weights",
            "random",
            "--device",
            "cpu",
            "--resizer",
            "bilinear",
        ]
    )
    with pytest.raises(ConfigError, match="unknown resizer 'bilinear'; choose one of .*torch_bilinear"):
        args.func(args)
