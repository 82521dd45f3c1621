"""benchmarks/gpu_check.sh, and the ``gpu``-marked tests it runs on a CUDA machine.

The script runs on the CPU with ``--dry-run`` (tiny sizes, every section) here; on a GPU machine it runs every
``gpu``-marked test of the suite (this file's, and the others' found by grep), measures, and writes one report.

The ``gpu`` tests (skipped without CUDA; ``pytest -m gpu``):

- fp16 synthesis and discriminator blocks against the same networks in float32. Tolerance 1e-2 of the image's
  largest value (logits: 1e-2 absolute + relative): the same blocks run in float16 on the CPU (emulated by
  forcing the blocks' dtype) differ from float32 by 7e-4 to 1.7e-3 of the image's largest value and by at most
  3e-3 in the logits (tiny networks of tests/test_networks.py, 3 seeds, resolutions 16 and 32).
- the reference's pinned outputs (tests/test_networks.py, measured with stylegan2-ada-pytorch on the CPU) on
  CUDA in float32 with TF32 off: relative 1e-4 (GPU kernels sum in another order).
- one training step of a tiny model with fp16 blocks under a CUDA Lightning trainer.
- sharded evaluation: 2 processes (gloo) on the GPU give the one-process numbers (relative 1e-4: cuDNN may pick
  other algorithms for the shards' batches).
- the evaluator's forward paths on CUDA: channels_last and compiled within their tolerances
  (fidmed.features.base), bf16 finite and close.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32():
    """fp32 on CUDA means fp32: TF32 off for matmuls and cuDNN convolutions (restored afterwards)."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ------------------------------------------------------------------------------------------------ GAN on CUDA
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("res,fp16_res", [(16, 2), (32, 4)])
def test_fp16_blocks_match_fp32_on_cuda(res, fp16_res, no_tf32):
    from test_networks import set_noise_strength, tiny_discriminator, tiny_generator

    torch.manual_seed(0)
    G = tiny_generator(res=res, fp16_res=fp16_res).eval().cuda()
    D = tiny_discriminator(res=res, fp16_res=fp16_res).cuda()
    set_noise_strength(G, 0.1)
    dtypes = []
    block = getattr(G.synthesis, f"b{res}")
    assert block.use_fp16 and getattr(D, f"b{res}").use_fp16
    block.conv1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    z = torch.randn(8, 32, device="cuda")
    with torch.no_grad():
        img16 = G(z, None, noise_mode="const")
        img32 = G(z, None, noise_mode="const", force_fp32=True)
        logits16, logits32 = D(img32, None), D(img32, None, force_fp32=True)
    assert dtypes == [torch.float16, torch.float32]  # the block really ran float16, then float32
    assert img16.dtype == torch.float32 and torch.isfinite(img16).all()
    scale = float(img32.abs().max())
    assert float((img16 - img32).abs().max()) <= 1e-2 * scale
    torch.testing.assert_close(logits16, logits32, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@cuda
def test_reference_outputs_on_cuda(no_tf32):
    import numpy as np
    from test_networks import REFERENCE_OUTPUTS, set_noise_strength, tiny_discriminator, tiny_generator

    for (arch_g, arch_d), (img_sum, first_pixels, expected_logits) in sorted(REFERENCE_OUTPUTS.items()):
        torch.manual_seed(0)
        G = tiny_generator(arch_g).eval()
        D = tiny_discriminator(arch_d)
        set_noise_strength(G, 0.1)
        z = torch.randn(4, 32)  # drawn on the CPU, as the reference's were
        G, D = G.cuda(), D.cuda()
        with torch.no_grad():
            img = G(z.cuda(), None, noise_mode="const")
            logits = D(img, None)
        img, logits = img.cpu(), logits.cpu()
        assert img.double().sum().item() == pytest.approx(img_sum, rel=1e-4), (arch_g, arch_d)
        np.testing.assert_allclose(img[0, 0, 0, :3].numpy(), first_pixels, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits.flatten().numpy(), expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_one_cuda_training_step_with_fp16_blocks():
    import lightning
    from test_training import tiny_module

    m = tiny_module(num_fp16_res=1, conv_clamp=256)
    assert m.G.synthesis.b16.use_fp16
    dtypes = []
    m.G.synthesis.b16.conv1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    batch = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(list(batch), batch_size=len(batch))
    trainer = lightning.Trainer(
        max_steps=1,
        accelerator="cuda",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, loader)
    after = m.state_dict()
    assert next(m.G.parameters()).is_cuda
    assert torch.float16 in dtypes  # the fp16 block ran in float16 during training
    for prefix in ("G.synthesis", "G.mapping", "D.", "G_ema.synthesis"):
        assert any(
            not torch.equal(before[k], after[k].cpu())
            for k in before
            if k.startswith(prefix) and before[k].is_floating_point()
        ), prefix
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert int(m.images_seen) == 8 and int(m.iteration) == 1


# ------------------------------------------------------------------------------------------------ evaluation on CUDA
N_REAL, N_GEN = 23, 19  # odd: uneven shards
SHARD_METRICS = ["fd", "rfd", "kid"]


def _cuda_evaluation(out_file: Path | None = None) -> list:
    from test_eval_speed import ConvToy, phantoms

    from fidmed.evaluation.evaluator import Evaluator

    ev = Evaluator(
        [ConvToy("a", seed=0), ConvToy("b", seed=1)],
        phantoms(N_REAL, 0),
        device="cuda",
        batch_size=4,
        metrics=SHARD_METRICS,
        metric_options={"kid": {"subsets": 3, "subset_size": 8}},
    )
    records = [(r.extractor, r.metric, r.value) for r in ev.evaluate(phantoms(N_GEN, 1))]
    if out_file is not None:
        out_file.write_text(json.dumps(records))
    return records


def _shard_worker(rank: int, world: int, out_dir: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _cuda_evaluation(out_dir / f"rank{rank}.json")


@pytest.mark.gpu
@cuda
def test_sharded_evaluation_on_cuda_equals_one_process(tmp_path, no_tf32):
    from fidmed.evaluation.distributed import spawn

    single = _cuda_evaluation()
    # gloo: the shards' moments are reduced on the CPU, the features come from the GPU
    spawn(_shard_worker, 2, tmp_path)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [(e, m) for e, m, _ in got] == [(e, m) for e, m, _ in single]
        for (ex, metric, v), (_, _, w) in zip(got, single, strict=True):
            assert v == pytest.approx(w, rel=1e-4, abs=1e-9), (rank, ex, metric)


@pytest.mark.gpu
@cuda
def test_forward_paths_on_cuda(no_tf32):
    from test_eval_speed import ConvToy, images, rel_dev, tiny_extractor

    from fidmed.features.base import CHANNELS_LAST_RTOL, COMPILE_RTOL, set_forward_path

    ex = tiny_extractor("resnet").cuda()
    x = images(4, ex.preprocessing.size).cuda()
    with torch.no_grad():
        contiguous = set_forward_path(ex, channels_last=False)(x)
        path = set_forward_path(ex, channels_last=True)
        assert rel_dev(path(path.prepare(x)), contiguous) <= CHANNELS_LAST_RTOL
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = path(path.prepare(x)).float()
        assert torch.isfinite(bf16).all() and rel_dev(bf16, contiguous) < 0.2
        toy = ConvToy().cuda()
        eager = toy(x[:, :, :16, :16])
        compiled = set_forward_path(toy, compile=True)
        assert rel_dev(compiled(compiled.prepare(x[:, :, :16, :16])), eager) <= COMPILE_RTOL


# ------------------------------------------------------------------------------------------------ the script
def _fake_wheel(folder: Path, dist: str, module: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel of ``dist`` providing ``module`` (what pip installs with --no-index)."""
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _env(tmp_path: Path, wheels: Path) -> dict:
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "FIDMED_WHEELS": str(wheels),
        "FIDMED_SITE": str(tmp_path / "site"),
        "TMPDIR": str(tmp_path),
    }


def test_dry_run_runs_every_section_and_writes_one_report(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "fidmed_gpu_check_probe", "fidmed_gpu_check_probe")
    _fake_wheel(wheels, "numpy", "numpy", "0.0.1")  # installed already: must not be shadowed
    report = tmp_path / "report.md"
    t = time.perf_counter()
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(report)],
        cwd=tmp_path,  # the script finds the repository from its own path
        env=_env(tmp_path, wheels),
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - t
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = report.read_text()
    assert text.startswith("# GPU check") and "DRY RUN" in text
    # every section ran and is listed with its duration
    for section in ("install", "environment", "tests", "training", "extractors", "evaluation", "memory", "compiled"):
        row = re.search(rf"^\| {section} \| (\w+) \| ([\d.]+) \|", text, re.M)
        assert row and row.group(1) == "ok", (section, text[:3000])
    assert float(re.search(r"total ([\d.]+) s", text).group(1)) <= seconds + 1
    # the install step installed the missing wheel only, into the site folder put on PYTHONPATH
    assert (tmp_path / "site" / "fidmed_gpu_check_probe" / "__init__.py").is_file()
    assert not (tmp_path / "site" / "numpy").exists()
    assert "fidmed_gpu_check_probe" in text and "already installed: numpy" in text
    # each section's results are in the one report
    assert re.search(r"passed|skipped|deselected", text)  # pytest's summary of the gpu tests (skipped: no CUDA)
    assert "| resnet | 32 |" in text  # extractors: images/s rows
    assert "(b) median" in text and "(d) pipeline" in text and "bf16" in text
    assert "peak RSS" in text and "fd,rfd,prdc" in text
    assert "s/kimg" in text or "kimg" in text  # benchmarks/train.py's report
    assert "not a GPU measurement" in text
    assert str(report) in out.stdout


def test_a_stopped_run_says_where_the_time_went(tmp_path):
    wheels = tmp_path / "no-wheels"  # absent: nothing to install
    report = tmp_path / "report.md"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(report)],
        cwd=tmp_path,
        env=_env(tmp_path, wheels),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("== training"):  # a section after the tests has started
                time.sleep(1.0)
                os.killpg(proc.pid, signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode != 0
    assert "stopped early" in text and "during section training" in text
    assert re.search(r"tests\s+ok\s+[\d.]+ s", text) and re.search(r"install\s+ok\s+[\d.]+ s", text)
    # the report holds what was done
    report_text = report.read_text()
    assert re.search(r"^\| tests \| ok \|", report_text, re.M)
    assert re.search(r"^\| training \| stopped \|", report_text, re.M)
    assert re.search(r"^\| extractors \| not run \|", report_text, re.M)
