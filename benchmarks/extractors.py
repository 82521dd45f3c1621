"""Benchmark: each feature extractor's images/s per forward path and precision, and what channels_last, bf16 and
torch.compile do to its features and FD.

    python benchmarks/extractors.py [--device cpu|cuda] [--batch 64] [--repeats 1] [--only NAME ...]
        [--modes fp32-contiguous fp32 bf16] [--input-size N] [--keras-cost] [--out FILE.md]

Modes: the precision (``fp32``, ``bf16`` autocast, as ``eval.precision``) and the forward path
(fidmed.features.base.set_forward_path): ``fp32`` and ``bf16`` run channels_last where the extractor declares it
safe (``eval.channels_last=true``), ``-contiguous`` every tensor contiguous (the default, ``eval.channels_last=false``),
``-compiled`` through torch.compile (``eval.compile=true``; its compilation time is reported apart).

Each extractor (random weights: same cost as real ones) gets one batch of ``--batch`` phantoms (256 px grey: the
first half seed 0, the second half seed 1), preprocessed as the evaluator does (not timed). Every mode runs the
batch once to warm up (and compile), then ``--repeats`` timed passes, the modes interleaved so that load changes
on a shared machine hit them alike; the best wall time is reported with the process CPU time of that pass and
the 1-minute load average before the extractor. The features of the timed passes give, per mode, the deviation
from the first mode (max |difference| / max |feature|) and the FD between the two halves (a small RANDOM-INIT
set: a plumbing number, not a property of the trained networks); a float64 run of the same network on two
images gives the float32 rounding yardstick: how far the first mode's own features are from exact arithmetic.
``--keras-cost``: the Keras-faithful networks vs the torchvision network of the same architecture at the same
input size (the cost of TF "same" padding and the Keras layout).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {  # name -> (precision, channels_last, compiled)
    "fp32": ("fp32", True, False),
    "fp32-contiguous": ("fp32", False, False),
    "bf16": ("bf16", True, False),
    "bf16-contiguous": ("bf16", False, False),
    "fp32-compiled": ("fp32", True, True),
    "bf16-compiled": ("bf16", True, True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, size: int | None, device: torch.device, dtype: torch.dtype = torch.float32):
    """A random-init extractor; ``size`` where the network takes it (fixed-size transformers keep theirs)."""
    from fidmed.errors import FidmedError
    from fidmed.features.registry import build_extractor

    cfg = {"name": name, "weights_source": "random"}
    try:
        ex = build_extractor({**cfg, "input_size": size} if size else cfg, allow_random=True)
    except FidmedError:
        ex = build_extractor(cfg, allow_random=True)
    return ex.to(device=device, dtype=dtype)


def phantom_batch(n: int) -> torch.Tensor:
    """``n`` uint8 phantoms [n, 1, 256, 256]: the first half seed 0, the second half seed 1."""
    from fidmed.data.phantom import render_phantoms

    a = render_phantoms(n // 2, 256, seed=0)
    b = render_phantoms(n - n // 2, 256, seed=1)
    return torch.cat([torch.from_numpy(a), torch.from_numpy(b)])


def run_mode(ex, path, x, precision: str, device: torch.device):
    """One pass: (features, wall seconds, process CPU seconds)."""
    from fidmed.evaluation.evaluator import forward_precision

    ex.to(memory_format=torch.channels_last if path.channels_last else torch.contiguous_format)
    x = path.prepare(x)
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad(), forward_precision(precision, device):
        y = path(x)
    _sync(device)
    return y.float(), time.perf_counter() - w0, time.process_time() - c0


def rel_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def float64_yardstick(name: str, size: int, x: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The same random network in float64 on ``x`` (exact-arithmetic stand-in), or None if it cannot run so."""
    try:
        ex = build(name, size, device, torch.float64)
        ex.check_input = lambda t: None  # it checks for float32 input
        with torch.no_grad():
            return ex(x.double())
    except Exception as e:  # noqa: BLE001 - a benchmark reports what it could not measure
        print(f"# {name}: no float64 run ({type(e).__name__}: {e})", flush=True)
        return None


def measure(name: str, images: torch.Tensor, args, device: torch.device) -> dict:
    from fidmed.features.base import ForwardPath
    from fidmed.features.preprocess import preprocess
    from fidmed.metrics.fd import frechet_distance_from_features

    load = os.getloadavg()[0]
    ex = build(name, args.input_size, device)
    size = ex.preprocessing.size
    x = preprocess(images, ex.preprocessing).to(device)
    half = x.shape[0] // 2
    compiled_fn = None
    paths = {}
    row: dict = {"name": name, "size": size, "dim": ex.feature_dim, "declares": bool(ex.channels_last), "load": load}
    for mode in args.modes:
        precision, cl, compiled = MODES[mode]
        path = ForwardPath(ex, cl and ex.channels_last, compiled, compiled_fn)
        _, wall, _ = run_mode(ex, path, x, precision, device)  # warm-up (and compilation)
        if path.compiled_fn is not None:  # not `or`: a compiled module forwards len() to the network
            compiled_fn = path.compiled_fn
        paths[mode] = path
        if compiled:
            row[f"{mode}/first"] = wall
    walls = {m: [] for m in args.modes}
    cpus = {m: [] for m in args.modes}
    feats = {}
    for _ in range(args.repeats):
        for mode in args.modes:
            feats[mode], wall, cpu = run_mode(ex, paths[mode], x, MODES[mode][0], device)
            walls[mode].append(wall)
            cpus[mode].append(cpu)
    first = args.modes[0]
    for mode in args.modes:
        i = min(range(len(walls[mode])), key=walls[mode].__getitem__)
        row[f"{mode}/wall"], row[f"{mode}/cpu"] = walls[mode][i], cpus[mode][i]
        row[f"{mode}/ips"] = x.shape[0] / walls[mode][i]
        row[f"{mode}/dev"] = rel_dev(feats[mode], feats[first])
        row[f"{mode}/equal"] = bool(torch.equal(feats[mode], feats[first]))
        f = feats[mode].double().cpu().numpy()
        row[f"{mode}/fd"] = frechet_distance_from_features(f[:half], f[half:]).value
    if not args.no_yardstick:
        ref = float64_yardstick(name, size, x[:2], device)
        if ref is not None:
            row["f64/dev"] = rel_dev(feats[first][:2], ref)
    row["load_after"] = os.getloadavg()[0]
    del ex, x
    return row


def keras_cost(rows: list[dict], args, device: torch.device, images: torch.Tensor) -> list[str]:
    """The Keras-faithful network vs the torchvision one of the same architecture, same size, first mode."""
    by_name = {r["name"]: r for r in rows}
    pairs = [(k, t) for k, t in (("keras_resnet", "resnet"), ("keras_inception", "inception")) if k in by_name]
    if not pairs:
        return []
    mode = args.modes[0]
    lines = [
        "",
        f"Keras-faithful network vs torchvision network of the same architecture, same input size ({mode}):",
        "",
        "| Keras-faithful | torchvision | input | Keras CPU s | torchvision CPU s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for k, t in pairs:
        saved = args.input_size
        args.input_size = by_name[k]["size"]
        plain = measure(t, images, argparse.Namespace(**{**vars(args), "modes": [mode], "no_yardstick": True}), device)
        args.input_size = saved
        kc, tc = by_name[k][f"{mode}/cpu"], plain[f"{mode}/cpu"]
        lines.append(f"| {k} | {t} | {plain['size']} | {kc:.2f} | {tc:.2f} | {kc / tc:.2f}x |")
    return lines


def report(rows: list[dict], args, device: torch.device, started: str, load0: tuple) -> str:
    from benchmarks.machine import cpu_name
    from fidmed.features.base import CHANNELS_LAST_RTOL, COMPILE_RTOL

    first = args.modes[0]
    dev_name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    load1 = os.getloadavg()
    lines = [
        "# Feature extractors: throughput and forward-path deviations",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores visible; device {device}{dev_name}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} intra-op threads",
        f"- started {started}; load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
        f"at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}",
        f"- batch {args.batch} phantoms (256 px, preprocessed as each extractor's protocol; not timed), random "
        f"weights; per mode one warm-up pass then {args.repeats} timed pass(es), modes interleaved, best wall time",
        f"- command: `python benchmarks/extractors.py {' '.join(sys.argv[1:])}`",
        "",
        "## Images/s",
        "",
        "| extractor | input | dim | "
        + " | ".join(f"{m} img/s (CPU s)" for m in args.modes)
        + " | load before/after |",
        "|---|---|---|" + "---|" * len(args.modes) + "---|",
    ]
    for r in rows:
        cells = [f"{r[f'{m}/ips']:.1f} ({r[f'{m}/cpu']:.1f})" for m in args.modes]
        lines.append(
            f"| {r['name']} | {r['size']} | {r['dim']} | {' | '.join(cells)} | {r['load']:.2f}/{r['load_after']:.2f} |"
        )
    compiled = [m for m in args.modes if MODES[m][2]]
    if compiled:
        lines += [
            "",
            "Compilation (first pass of a compiled mode, seconds): "
            + "; ".join(f"{r['name']} " + ", ".join(f"{m} {r[f'{m}/first']:.0f}" for m in compiled) for r in rows),
        ]
    lines += [
        "",
        f"## Deviations from {first} (RANDOM-INIT networks)",
        "",
        f"Features: max |difference| / max |{first} feature| over the batch (`equal`: bit-identical). Yardstick: the "
        f"same for {first} against a float64 run of the same network (2 images), i.e. float32 rounding itself. FD: "
        f"between the two halves of the batch ({args.batch // 2} vs {args.batch - args.batch // 2} phantoms, "
        "RANDOM-INIT: plumbing numbers, not comparable to any published FD), relative to the "
        f"{first} FD. Tolerances (fidmed.features.base): channels_last {CHANNELS_LAST_RTOL:g}, compiled "
        f"{COMPILE_RTOL:g}.",
        "",
        "| extractor | declares channels_last | yardstick | "
        + " | ".join(f"{m} features | {m} FD (rel. dev.)" for m in args.modes[1:])
        + f" | {first} FD |",
        "|---|---|---|" + "---|---|" * (len(args.modes) - 1) + "---|",
    ]
    for r in rows:
        cells = []
        for m in args.modes[1:]:
            feat = "equal" if r[f"{m}/equal"] else f"{r[f'{m}/dev']:.1e}"
            fd_dev = abs(r[f"{m}/fd"] - r[f"{first}/fd"]) / max(abs(r[f"{first}/fd"]), 1e-300)
            cells += [feat, f"{r[f'{m}/fd']:.6g} ({fd_dev:.1e})"]
        yard = f"{r['f64/dev']:.1e}" if "f64/dev" in r else "-"
        lines.append(
            f"| {r['name']} | {'yes' if r['declares'] else 'no'} | {yard} | {' | '.join(cells)} | "
            f"{r[f'{first}/fd']:.6g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from fidmed.features.registry import EXTRACTORS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="extractors (default: every registered one)")
    ap.add_argument("--modes", nargs="+", default=["fp32-contiguous", "fp32", "bf16"], choices=list(MODES))
    ap.add_argument("--input-size", type=int, default=None, help="override where the network takes it (tests)")
    ap.add_argument("--no-yardstick", action="store_true", help="skip the float64 run")
    ap.add_argument("--keras-cost", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    names = EXTRACTORS.names()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown extractor(s) {', '.join(unknown)}; registered: {', '.join(names)}")
        names = [n for n in names if n in args.only]
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load0 = os.getloadavg()
    images = phantom_batch(args.batch)
    rows = []
    for n in names:
        r = measure(n, images, args, device)
        rows.append(r)
        print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}, flush=True)  # 4 digits
    text = report(rows, args, device, started, load0)
    if args.keras_cost:
        text += "\n".join(keras_cost(rows, args, device, images)) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
