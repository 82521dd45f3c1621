"""Evaluation-engine measurements (issue 5). Usage:

    python benchmarks/evaluate.py --real DIR --gen DIR [--extractor A B ...] [--num N] [--device cpu|cuda]

(a) FD deviation of bf16 forward passes from fp32, per extractor (pretrained weights where present in the
    weights folder; otherwise random-init, printed as RANDOM-INIT: a plumbing number, NOT a precision claim);
(b) wall time of the single pass over all extractors vs the same extractors run one by one (real stats + gen);
(c) inception_tf vs `python -m pytorch_fid`: needs pytorch-fid's weights file pt_inception-2015-12-05-*.pth in
    the weights folder (or torch hub cache); skipped with a message when absent.
Without folders (--real/--gen omitted) it writes random 64x64 grey PNGs to a temporary folder.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _folder(path: Path, n: int, seed: int, size: int = 64) -> Path:
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path / f"{i:05d}.png")
    return path


def _extractors(names, weights_dir):
    from fidmed.evaluation.cli import build_cli_extractors
    from fidmed.errors import FidmedError

    out = []
    for name in names:
        try:
            out += build_cli_extractors([name], "pretrained", weights_dir)
        except FidmedError:
            out += build_cli_extractors([name], "random", weights_dir)
    return out


def _run(extractors, real, gen, device, precision="fp32", batch_size=16):
    from fidmed.evaluation.evaluator import Evaluator

    ev = Evaluator(extractors, real, device=device, precision=precision, batch_size=batch_size, metrics=["fd"])
    t = time.perf_counter()
    recs = ev.evaluate(gen)
    return {r.extractor: r.value for r in recs}, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real"), ap.add_argument("--gen")
    ap.add_argument("--extractor", nargs="+", default=["inception_tf", "resnet"])
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c"])
    args = ap.parse_args()
    from fidmed.data.folder import ImageFolderDataset
    from fidmed.evaluation.sources import DatasetSource

    tmp = Path(tempfile.mkdtemp())
    real_dir = Path(args.real) if args.real else _folder(tmp / "real", args.num, 0)
    gen_dir = Path(args.gen) if args.gen else _folder(tmp / "gen", args.num, 1)
    real = DatasetSource(ImageFolderDataset(real_dir), args.num)
    gen = DatasetSource(ImageFolderDataset(gen_dir), args.num)
    device = torch.device(args.device)
    exs = _extractors(args.extractor, args.weights_dir)
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {device}; N = {args.num} real / {args.num} gen; "
          f"real={real_dir} gen={gen_dir}")
    for ex in exs:
        print(f"#   {ex.name}: weights {ex.weights_label}")
    if "a" not in args.skip:
        print("\n## (a) bf16 vs fp32 FD")
        fp32, _ = _run(exs, real, gen, device)
        bf16, _ = _run(exs, real, gen, device, "bf16")
        for ex in exs:
            tag = " RANDOM-INIT (plumbing only)" if ex.random_init else ""
            rel = abs(bf16[ex.name] - fp32[ex.name]) / abs(fp32[ex.name])
            print(f"{ex.name:>24}: FD fp32 {fp32[ex.name]:.6f}  bf16 {bf16[ex.name]:.6f}  rel.dev {rel:.2e}{tag}")
    if "b" not in args.skip:
        print("\n## (b) single pass vs one by one (real stats + generated, fp32)")
        _, t_single = _run(exs, real, gen, device)
        t_sep = sum(_run([ex], real, gen, device)[1] for ex in exs)
        print(f"single pass {t_single:.1f} s, one by one {t_sep:.1f} s, speed-up {t_sep / t_single:.2f}x")
    if "c" not in args.skip:
        print("\n## (c) inception_tf vs pytorch_fid")
        ex = _extractors(["inception_tf"], args.weights_dir)[0]
        if ex.random_init:
            print("SKIPPED: pytorch-fid's weights file (pt_inception-2015-12-05-6726825d.pth) is not here; "
                  "`fidmed weights import` it and re-run. Comparing random-init networks would not test parity.")
        else:
            fd, t_ours = _run([ex], real, gen, device)
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "pytorch_fid", str(gen_dir), str(real_dir), "--device", str(device),
                   "--dims", "2048"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            t_ref = time.perf_counter() - t
            ref = float(out.strip().split()[-1])
            print(f"fidmed {fd['inception_tf']:.9f} ({t_ours:.1f} s), pytorch_fid {ref:.9f} ({t_ref:.1f} s), "
                  f"rel.diff {abs(fd['inception_tf'] - ref) / ref:.2e}")


if __name__ == "__main__":
    main()
