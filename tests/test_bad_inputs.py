"""The bad-input matrix: every mistake a user can make gets one line that names the fix, exit status 2, no
traceback, and nothing written or left behind (README "Troubleshooting" lists the same cases).

Three entry points: the `fidmed` command (in-process through ``fidmed.cli.main``), run.py's configuration
(composed as run.py composes it) and run.py's job (``fidmed.job.run_job``, the code behind every run.py job), plus
two real run.py processes for the exit status and the files a failed run leaves (error.txt, run.log).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.images import png_folder
from helpers.runpy import run_py

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working folder with good and bad inputs; the tests run inside it."""
    monkeypatch.chdir(tmp_path)
    png_folder(tmp_path / "gen", 6, 1)
    png_folder(tmp_path / "real", 8, 2)
    png_folder(tmp_path / "rgb", 6, 3, mode="RGB")
    (tmp_path / "empty").mkdir()
    png_folder(tmp_path / "mixed", 3, 4)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "mixed" / "999.png")
    png_folder(tmp_path / "deep", 2, 5)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint16)).save(tmp_path / "deep" / "999.png")
    (tmp_path / "notes.txt").write_text("hello")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "image.pkl", format="PNG")
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(256))
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "swav_800ep_pretrain.pth.tar").write_bytes(np.random.default_rng(1).bytes(512))
    monkeypatch.setenv("FIDMED_WEIGHTS", str(tmp_path / "weights"))
    return tmp_path


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _error_lines(text: str) -> list[str]:
    """stderr without progress bars (tqdm lines are progress, not messages)."""
    return [line for line in text.splitlines() if line.strip() and "img/s" not in line and "%|" not in line]


R = ["--weights", "random", "--device", "cpu"]

# (case id, fidmed arguments, what the one line must say: the problem and the fix)
CLI_CASES = [
    ("evaluate: generated folder missing", ["evaluate", "nope", "real", *R], "nope does not exist; give a folder"),
    ("evaluate: real folder missing", ["evaluate", "gen", "nope", *R], "create it with `fidmed prepare"),
    ("evaluate: generated is a text file", ["evaluate", "notes.txt", "real", *R], "neither a folder of images nor"),
    (
        "evaluate: unknown extractor",
        ["evaluate", "gen", "real", "--extractor", "nope"],
        "unknown extractor 'nope'; available: clip",
    ),
    (
        "evaluate: unknown metric",
        ["evaluate", "gen", "real", "--metrics", "fd", "nope", *R],
        "unknown metric 'nope'; available: fd, fd_inf, kid, prdc, rfd",
    ),
    (
        "evaluate: more real images than exist",
        ["evaluate", "gen", "real", "--num-real", "99", *R],
        "holds only 8; lower the number requested",
    ),
    (
        "evaluate: more generated images than exist",
        ["evaluate", "gen", "real", "--num-gen", "99", *R],
        "holds only 6; lower the number requested",
    ),
    (
        "evaluate: --out not writable",
        ["evaluate", "gen", "real", "--out", "/proc/fidmed/res.json", *R],
        "cannot be written (/proc is not writable); choose another location",
    ),
    ("evaluate: --out is a folder", ["evaluate", "gen", "real", "--out", "gen", *R], "is a folder; give a file name"),
    (
        "evaluate: --cache-dir is a file",
        ["evaluate", "gen", "real", "--cache-dir", "notes.txt", *R],
        "is a file; give a folder",
    ),
    (
        "evaluate: --cache-dir not writable",
        ["evaluate", "gen", "real", "--cache-dir", "/proc/fidmed-cache", *R],
        "cannot be written",
    ),
    (
        "evaluate: unknown resizer",
        ["evaluate", "gen", "real", "--resizer", "bilinear", *R],
        "unknown resizer 'bilinear'; choose one of clean",
    ),
    ("evaluate: generator without --num-gen", ["evaluate", "random.pt", "real", *R], "needs --num-gen N"),
    (
        "evaluate: random bytes as a generator",
        ["evaluate", "random.pt", "real", "--num-gen", "4", *R],
        "unrecognised content, not a fidmed generator file",
    ),
    (
        "evaluate: a PNG named .pkl",
        ["evaluate", "image.pkl", "real", "--num-gen", "4", *R],
        "is a PNG image, not a fidmed generator file",
    ),
    (
        "evaluate: a damaged torch zip",
        ["evaluate", "archive.pt", "real", "--num-gen", "4", *R],
        "damaged or truncated PyTorch file",
    ),
    ("evaluate: an empty checkpoint", ["evaluate", "model.ckpt", "real", "--num-gen", "4", *R], "is an empty file"),
    ("evaluate: a folder without images", ["evaluate", "empty", "real", *R], "holds no .png"),
    (
        "evaluate: grey vs RGB",
        ["evaluate", "rgb", "real", "--extractor", "resnet", *R],
        "3 channel(s) but the real images have 1",
    ),
    (
        "evaluate: images of different sizes",
        ["evaluate", "mixed", "real", "--extractor", "resnet", *R],
        "differ in size",
    ),
    ("evaluate: a 16-bit image", ["evaluate", "deep", "real", *R], "fidmed reads 8-bit images only. Rescale it"),
    (
        "evaluate: an option of the wrong type",
        ["evaluate", "gen", "real", "--set", "prdc.k=abc", *R],
        "could not be converted to Integer",
    ),
    (
        "evaluate: an unknown eval setting",
        ["evaluate", "gen", "real", "--set", "bogus=1", *R],
        "Key 'bogus' not in 'Eval'",
    ),
    (
        "evaluate: a metric option out of range",
        ["evaluate", "gen", "real", "--metrics", "prdc", "--set", "prdc.k=0", *R],
        "eval.prdc.k=0 must be >= 1",
    ),
    ("evaluate: tf32 on the CPU", ["evaluate", "gen", "real", "--precision", "tf32", *R], "needs a CUDA device"),
    (
        "evaluate: cuda without a GPU",
        ["evaluate", "gen", "real", "--weights", "random", "--device", "cuda"],
        "no CUDA device is available; use eval.device=cpu",
    ),
    (
        "evaluate: weights missing offline",
        ["evaluate", "gen", "real", "--extractor", "inception_tf"],
        "fidmed weights import",
    ),
    ("weights import: no such file", ["weights", "import", "nope.pth"], "is not a file; give the path"),
    ("weights import: random bytes", ["weights", "import", "random.pt"], "matches no known weights file"),
    (
        "weights import: random bytes named like SwAV",
        ["weights", "import", "swav_800ep_pretrain.pth.tar"],
        "swav_800ep_pretrain.pth.tar",
    ),
    ("weights download: unknown extractor", ["weights", "download", "nope"], "unknown extractor 'nope'"),
    ("import-generator: a folder", ["import-generator", "gen"], "is a folder, not a stylegan2-ada-pytorch"),
    ("import-generator: a torch file", ["import-generator", "archive.pt"], "is a PyTorch file"),
    ("import-generator: a PNG", ["import-generator", "image.pkl"], "is a PNG image, not a stylegan2-ada-pytorch"),
    ("import-generator: no such file", ["import-generator", "missing.pkl"], "pickle not found"),
    ("prepare: source missing", ["prepare", "ct", "--src", "nope", "--out", "out1"], "pass the raw dataset's folder"),
    ("prepare: --out is a file", ["prepare", "xray", "--src", "real", "--out", "notes.txt"], "is a file, not a folder"),
    ("prepare: source is a file", ["prepare", "xray", "--src", "notes.txt", "--out", "out2"], "is not a folder"),
    (
        "prepare: --out not writable",
        ["prepare", "xray", "--src", "real", "--out", "/proc/fidmed/out"],
        "choose a folder you can write to",
    ),
    ("collect: no such folder", ["collect", "nope", "--out", "r.csv"], "pass run folders"),
    ("collect: a folder without runs", ["collect", "gen", "--out", "r.csv"], "no results.json in gen"),
    ("analyze: no such table", ["analyze", "nope.csv"], "nope.csv does not exist; pass run folders"),
    ("analyze: not a results table", ["analyze", "notes.txt"], "is not a results.json file"),
    ("vtt score: no answers", ["vtt", "score", "notes.txt"], "pass the raters' downloaded answer CSVs"),
    (
        "vtt make: real folder missing",
        ["vtt", "make", "--real", "nope", "--model", "a=gen", "--out", "v", "--modality", "ct"],
        "create it with `fidmed prepare",
    ),
    (
        "vtt make: too few real images",
        ["vtt", "make", "--real", "real", "--model", "a=gen", "--out", "v", "--modality", "ct"],
        "allow reuse (--reuse-real)",
    ),
    (
        "stats: an empty table",
        ["stats", "notes.txt", "--test", "ks", "--num-col", "x", "--split", "y"],
        "pass a CSV with a header line",
    ),
]


@pytest.mark.parametrize("args, expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_fidmed_command(files, capsys, args, expected):
    from fidmed.cli import main

    before = _snapshot(files)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("fidmed"), lines
    assert expected in lines[0], lines[0]
    assert _snapshot(files) == before, "the failed command left something behind"


# ------------------------------------------------------------------------------------------------ run.py config
CONFIG_CASES = [
    ("training length not a number", ["schedule.kimg=abc"], "schedule.kimg"),
    ("image count not a number", ["eval.num_gen=abc"], "could not be converted to Int"),
    ("a misspelt new key", ["+trainer.kimgg=1"], "Key 'kimgg' not in 'Trainer'"),
    ("a misspelt metric option", ["+eval.prdc.kk=1"], "Key 'kk' not in 'PRDCConfig'"),
    ("a key that moved", ["trainer.kimg=3"], "trainer.kimg is now schedule.kimg"),
    ("another key that moved", ["eval.knn_k=3"], "eval.knn_k is now eval.prdc.k"),
    ("unknown extractor", ["extractor=[nope]"], "unknown extractor 'nope'; available"),
    ("unknown augmentation", ["augmentation=foo"], "unknown augmentation 'foo'; available: ada"),
    ("unknown modality", ["modality=nope"], "unknown modality 'nope'; available"),
    ("unknown stage", ["stage=bogus"], "bogus"),
    ("unknown forward precision", ["eval.precision=fp16"], "fp16"),
    ("unknown weights mode", ["eval.weights=maybe"], "maybe"),
    ("a float for an integer", ["seed=1.5"], "seed"),
    ("a hyper-parameter not a number", ["model.r1_gamma=abc"], "model.r1_gamma"),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_run_py_config(files, overrides, expected):
    from fidmed.config import compose_config
    from fidmed.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ run.py job
SMOKE = ["experiment=smoke", "logger=none"]
JOB_CASES = [
    ("stage=evaluate without a generator", ["stage=evaluate"], "needs generator=PATH"),
    (
        "the study's length for a phantom",
        ["NO_SMOKE", "logger=none", "schedule=study"],
        "set schedule.kimg=N or choose schedule=default",
    ),
    ("zero training length", ["schedule.kimg=0"], "training length must be > 0"),
    ("zero generated images", ["eval.num_gen=0"], "eval.num_gen=0 must be >= 1"),
    ("more real images than the set has", ["eval.num_real=1000"], "lower eval.num_real or leave it null"),
    ("a generator file that does not exist", ["stage=evaluate", "generator=missing.pt"], "missing.pt"),
    (
        "a prepared modality not prepared",
        ["NO_SMOKE", "logger=none", "modality=ct", "eval.weights=random"],
        "fidmed prepare ct",
    ),
    ("cuda for evaluation without a GPU", ["eval.device=cuda"], "no CUDA device is available"),
    ("a GPU trainer without a GPU", ["trainer=gpu"], "trainer=cpu"),
    ("unknown metric", ["eval.metrics=[fd,nope]"], "unknown metric 'nope'"),
    ("a metric option out of range", ["eval.metrics=[prdc]", "eval.prdc.k=0"], "must be >= 1"),
    ("KID subsets out of range", ["eval.metrics=[kid]", "eval.kid.subsets=0"], "eval.kid.subsets=0 must be >= 1"),
    ("a run folder that cannot be written", ["hydra_run_dir=/proc/fidmed-run"], "choose another location"),
    ("a cache folder that cannot be written", ["paths.cache_dir=/proc/fidmed-cache"], "paths.cache_dir"),
    ("a training folder that cannot be written", ["paths.train_root=/proc/fidmed-train"], "paths.train_root"),
    ("real weights missing offline", ["eval.weights=pretrained"], "fidmed weights import"),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in JOB_CASES], ids=[c[0] for c in JOB_CASES])
def test_run_py_job(files, overrides, expected):
    from fidmed.config import compose_config
    from fidmed.errors import FidmedError
    from fidmed.job import run_job

    run_dir = files / "run"
    overrides = list(overrides)
    for o in list(overrides):
        if o.startswith("hydra_run_dir="):
            overrides.remove(o)
            run_dir = Path(o.split("=", 1)[1])
    base = [] if "NO_SMOKE" in overrides else SMOKE
    overrides = [o for o in overrides if o != "NO_SMOKE"]
    cfg = compose_config([*base, f"paths.root={files}", *overrides])
    before = _snapshot(files)
    with pytest.raises(FidmedError) as info:
        run_job(cfg, run_dir)
    assert expected in str(info.value)
    assert "\n\n" not in str(info.value)
    left = _snapshot(files) - before
    assert not {p for p in left if not p.startswith("run")}, f"left behind: {left}"
    assert not any(p.endswith(("results.json", "final.pt", ".npz")) for p in left)


# ------------------------------------------------------------------------------------------------ run.py process
def test_run_py_exits_2_with_one_line_and_leaves_error_txt_and_run_log(files):
    out = run_py(files, *SMOKE, "stage=evaluate", f"hydra.run.dir={files / 'runA'}", run_dir=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and "needs generator=PATH" in lines[0]
    assert "needs generator=PATH" in (files / "runA" / "error.txt").read_text()
    assert "needs generator=PATH" in (files / "runA" / "run.log").read_text()  # not an empty log


def test_run_py_refuses_a_bad_config_before_creating_anything(files):
    out = run_py(files, "schedule.kimg=abc", f"hydra.run.dir={files / 'runB'}", run_dir=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(_error_lines(out.stderr)) == 1 and "schedule.kimg" in out.stderr
    assert not (files / "runB").exists() and not (files / "outputs").exists()
