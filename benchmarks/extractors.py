"""Benchmark: images/s of each feature extractor on this machine (fp32, batch 16, random weights).

Random weights cost the same as real ones. Wall time and process CPU time (``time.process_time``, all threads) are
both reported, because the development VM is shared. Keras-faithful networks
(``fidmed.features.extractors.keras_apps``) are included, and the cost of Keras "same" padding is their time relative
to the plain torchvision network of the same architecture (ResNet50, InceptionV3) at the same input size.

    python benchmarks/extractors.py --out benchmarks/results/extractors.md [--device cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fidmed.features.registry import EXTRACTORS, build_extractor


def measure(name: str, batch: int, repeats: int, device: str, bf16: bool, size: int | None) -> dict:
    cfg = {"name": name, "weights_source": "random"}
    if size:
        cfg["input_size"] = size
    ex = build_extractor(cfg, allow_random=True).to(device)
    s = ex.preprocessing.size
    x = torch.rand(batch, 3, s, s, device=device) * 255
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else torch.no_grad()
    walls, cpus = [], []
    with torch.no_grad(), ctx:
        ex(x)  # warm-up
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            ex(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    wall, cpu = min(walls), min(cpus)
    return {"name": name, "size": s, "dim": ex.feature_dim, "wall": wall, "cpu": cpu, "ips": batch / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    names = EXTRACTORS.names()
    if args.only:
        names = [n for n in names if n in args.only]
    rows = []
    for n in names:
        r = measure(n, args.batch, args.repeats, args.device, args.bf16, None)
        rows.append(r)
        print(r, flush=True)
    load = os.getloadavg()
    cpu_name = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    lines = [
        "# Feature extractors: throughput",
        "",
        f"- device: {args.device} ({cpu_name}, {os.cpu_count()} logical cores visible); torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads; load average after the run {load[0]:.2f}",
        f"- fp32{' + bf16 autocast' if args.bf16 else ''}, batch {args.batch}, random weights, best of "
        f"{args.repeats} timed batches after one warm-up; preprocessing (resize) not included",
        f"- command: `python benchmarks/extractors.py {' '.join(sys.argv[1:])}`",
        "",
        "| extractor | input | dim | wall s / batch | CPU s / batch | images/s (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['size']} | {r['dim']} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['ips']:.1f} |")
    # Cost of Keras-faithful TF "same" padding: the Keras-layout network vs the plain torchvision network of the
    # same architecture at the same input size (both random weights, same batch).
    by_name = {r["name"]: r for r in rows}
    pairs = [(k, t) for k, t in (("keras_resnet", "resnet"), ("keras_inception", "inception")) if k in by_name]
    if pairs:
        lines += [
            "",
            "Keras-faithful network vs torchvision network of the same architecture, same input size:",
            "",
            "| Keras-faithful | torchvision | input | Keras CPU s | torchvision CPU s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for k, t in pairs:
            plain = measure(t, args.batch, args.repeats, args.device, args.bf16, by_name[k]["size"])
            lines.append(
                f"| {k} | {t} | {plain['size']} | {by_name[k]['cpu']:.2f} | {plain['cpu']:.2f} | "
                f"{by_name[k]['cpu'] / plain['cpu']:.2f}x |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
