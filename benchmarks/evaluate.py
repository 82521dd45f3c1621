"""Evaluation-engine measurements (issue 5). Usage:

    python benchmarks/evaluate.py [--only a b c d e] [--extractor A B ...] [--num N] [--device cpu|cuda]
                                  [--real DIR --gen DIR] [--parity-num 2000] [--mem-num 50000] [--out FILE.md]

(a) FD deviation of bf16 forward passes from fp32, per extractor (pretrained weights where present in the
    weights folder; otherwise random-init, printed as RANDOM-INIT: a plumbing number, NOT a precision claim).
(b) wall time of the single pass over all extractors vs the same extractors run one by one (real statistics +
    generated set, fp32), with where the time goes: input pipeline (decode + each distinct preprocessing) and
    each extractor's forward passes, and the speed-up those parts allow at most (shared work / total).
(c) ``inception_tf`` vs ``python -m pytorch_fid`` on the same images with the same weights file: throughput and
    FD. Without pytorch-fid's real weights file (it cannot be downloaded on an offline machine) the script
    writes a self-made one: the FID Inception network with seeded random weights, saved in pytorch-fid's
    format, placed where pytorch-fid looks for its file (``$TORCH_HOME/hub/checkpoints``) and loaded by fidmed
    with that file's sha256. Both tools then read the very same bytes; what is compared is everything but the
    trained weight values: decoding, 299x299 input handling, forward pass, moments and FD.
    Images: 299x299 grey PNGs (phantoms, fidmed.data.phantom, resized from 256 px), so that neither tool
    resamples (pytorch-fid's bilinear resize to 299 is the identity there; fidmed's resizers are skipped at the
    target size) and the comparison is exact by construction.
(d) the full pipeline's images/s as a share of the pure forward-pass bound of the same extractors (the time of
    the forward passes alone on already preprocessed inputs), with the input pipeline threaded (default) and
    in the main thread (--workers 0 equivalent).
(e) peak memory of a whole evaluation (``--mem-num`` generated images from a random-init study-size StyleGAN2,
    ``--mem-resolution`` px grey; ``--mem-real`` phantom real images) with metrics fd rfd and with fd rfd prdc
    (``--mem-metrics``), each in its own process: peak resident host memory (ru_maxrss) and, on CUDA, torch's
    peak allocated device memory.
Without folders (--real/--gen omitted), (a), (b) and (d) use 256x256 phantoms (real: seed 0; "generated":
seed 1, blurred) written to a temporary folder. Extractors run as the evaluator runs them by default (contiguous,
fp32; fidmed.features.base.set_forward_path), with pretrained weights where the weights folder has
them and random-init (labelled) otherwise; ``--input-size`` overrides the input size of those that take another
(quick checks only: not the study's protocol). ``--out`` writes everything printed to a Markdown file too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def study_extractors() -> list[str]:
    """The study's eleven extractors, as ``experiment=paper`` selects them (the one list of them)."""
    from fidmed.config import compose_config

    return list(compose_config(["experiment=paper"]).extractor)


def phantom_folder(path: Path, n: int, seed: int, size: int = 256, blur: float = 0.0) -> Path:
    """``n`` grey phantom PNGs (``size`` px; resized with PIL bicubic from 256 px when size != 256)."""
    from PIL import Image, ImageFilter

    from fidmed.data.phantom import render_phantoms

    path.mkdir(parents=True, exist_ok=True)
    if len(list(path.glob("*.png"))) == n:
        return path
    print(f"# writing {n} phantom PNGs ({size} px) to {path} ...", flush=True)
    images = render_phantoms(n, 256, seed=seed, num_workers=min(4, os.cpu_count() or 1))
    for i, img in enumerate(images):
        im = Image.fromarray(img[0])
        if blur:
            im = im.filter(ImageFilter.GaussianBlur(blur))
        if size != 256:
            im = im.resize((size, size), Image.BICUBIC)
        im.save(path / f"{i:05d}.png")
    return path


def _extractors(names, weights_dir, input_size=None):
    """Each extractor with its pretrained weights where the weights folder has them, else random-init (labelled)."""
    from fidmed.errors import FidmedError
    from fidmed.features.registry import build_extractor

    out = []
    for name in names:
        cfg = {"name": name}
        if input_size:
            try:  # where the network takes it; fixed-size transformers keep theirs
                build_extractor({**cfg, "input_size": input_size, "weights_source": "random"}, allow_random=True)
                cfg["input_size"] = input_size
            except FidmedError:
                pass
        try:
            out.append(build_extractor(cfg, weights_dir=weights_dir))
        except FidmedError:
            out.append(build_extractor({**cfg, "weights_source": "random"}, allow_random=True))
    return out


def _source(folder, num):
    from fidmed.evaluation.cli import gen_source  # a folder: its first num images, decoded on the fly

    return gen_source(str(folder), num, 0, 1.0, "cpu")


def _run(extractors, real, gen, device, precision="fp32", batch_size=16, workers="auto"):
    from fidmed.evaluation.evaluator import Evaluator

    ev = Evaluator(
        extractors, real, device=device, precision=precision, batch_size=batch_size, metrics=["fd"], num_workers=workers
    )
    t = time.perf_counter()
    recs = ev.evaluate(gen)
    return {r.extractor: r.value for r in recs}, time.perf_counter() - t


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_parts(extractors, source, device, batch_size):
    """Seconds of (input pipeline for the given preprocessings, in the main thread) and of each forward pass (on
    the evaluator's default forward path: contiguous, fp32 with TF32 off)."""
    from fidmed.evaluation.evaluator import forward_precision
    from fidmed.evaluation.pipeline import prepared_batches
    from fidmed.features.base import set_forward_path

    specs = list(dict.fromkeys(ex.preprocessing for ex in extractors))
    t = time.perf_counter()
    batches = list(prepared_batches(source, batch_size, range(len(source)), specs, device, workers=0))
    _sync(device)
    t_in = time.perf_counter() - t
    t_in_spec = {}
    for spec in specs:
        t = time.perf_counter()
        list(prepared_batches(source, batch_size, range(len(source)), [spec], device, workers=0))
        _sync(device)
        t_in_spec[spec] = time.perf_counter() - t
    t_fwd = {}
    for ex in extractors:
        ex.to(device).eval()
        path = set_forward_path(ex)
        with torch.no_grad(), forward_precision("fp32", device):
            path(path.prepare(batches[0].inputs[ex.preprocessing]))  # warm-up (lazy init, cuDNN autotune)
            _sync(device)
            t = time.perf_counter()
            for b in batches:
                path(path.prepare(b.inputs[ex.preprocessing]))
            _sync(device)
        t_fwd[ex.name] = time.perf_counter() - t
    return t_in, t_in_spec, t_fwd


def section_b_d(exs, real, gen, device, batch_size, do_b, do_d, repeats=1):
    from fidmed.evaluation.pipeline import default_workers

    print(f"\n## (b)/(d) single pass, one by one, and the forward-pass bound (fp32, batch {batch_size})")
    t_in_all, t_in_spec, t_fwd = time_parts(exs, gen, device, batch_size)
    fwd = sum(t_fwd.values())
    print(
        f"generated set ({len(gen)} images): input pipeline for all {len(t_in_spec)} distinct preprocessings "
        f"{t_in_all:.2f} s (main thread); forward passes {fwd:.2f} s in all"
    )
    for spec, t in t_in_spec.items():
        users = [ex.name for ex in exs if ex.preprocessing == spec]
        print(f"    input {spec.key:>20}: {t:6.2f} s  (used by {', '.join(users)})")
    for ex in exs:
        print(f"    forward {ex.name:>22}: {t_fwd[ex.name]:6.2f} s")
    one_by_one_parts = sum(t_in_spec[ex.preprocessing] + t_fwd[ex.name] for ex in exs)
    print(
        f"speed-up the shared work allows at most (one-by-one parts / single-pass parts): "
        f"{one_by_one_parts / (t_in_all + fwd):.2f}x"
    )
    if do_b:
        singles, seps = [], []
        for rep in range(repeats):  # interleaved, so that load changes on a shared machine hit both alike
            singles.append(_run(exs, real, gen, device, batch_size=batch_size)[1])
            seps.append(sum(_run([ex], real, gen, device, batch_size=batch_size)[1] for ex in exs))
            print(
                f"(b) repeat {rep + 1}: single pass {singles[-1]:.1f} s, one by one {seps[-1]:.1f} s "
                f"(real statistics + generated set)"
            )
        t_single, t_sep = float(np.median(singles)), float(np.median(seps))
        print(
            f"(b) median of {repeats}: single pass {t_single:.1f} s, one by one {t_sep:.1f} s: "
            f"speed-up {t_sep / t_single:.2f}x"
        )
    if do_d:
        rates = {}
        for workers in ("auto", 0):
            from fidmed.evaluation.evaluator import collect_moments
            from fidmed.evaluation.pipeline import resolve_workers

            w = resolve_workers(workers)
            t = time.perf_counter()
            collect_moments(gen, exs, batch_size, device, False, workers=w)
            _sync(device)
            rates[w] = len(gen) / (time.perf_counter() - t)
        bound = len(gen) / fwd
        for w, rate in rates.items():
            print(
                f"(d) pipeline with {w} input threads: {rate:.2f} img/s = {100 * rate / bound:.1f}% of the "
                f"forward-pass bound {bound:.2f} img/s (default threads here: {default_workers()})"
            )


def self_made_fid_weights(path: Path, seed: int = 0) -> Path:
    """pytorch-fid's FID Inception network with seeded random weights, saved as pytorch-fid's state dict."""
    from fidmed.features.base import seeded_init_
    from fidmed.features.extractors.inception_tf import FIDInceptionV3

    net = FIDInceptionV3()
    seeded_init_(net, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def section_c(real_dir: Path, gen_dir: Path, device, batch_size: int, workdir: Path) -> None:
    import dataclasses

    from fidmed.features.registry import build_extractor, extractor_setup
    from fidmed.features.weights import sha256_of

    print("\n## (c) inception_tf vs python -m pytorch_fid (same images, same weights file)")
    setup = extractor_setup("inception_tf")
    name = setup.weights.filename
    torch_home = workdir / "torch_home"
    weights = torch_home / "hub" / "checkpoints" / name
    real_file = None
    for cand in [
        Path(os.environ.get("FIDMED_WEIGHTS", "~/.cache/fidmed/weights")).expanduser() / name,
        Path(torch.hub.get_dir()) / "checkpoints" / name,
    ]:
        if cand.is_file():
            real_file = cand
    if real_file is not None:
        weights.parent.mkdir(parents=True, exist_ok=True)
        if not weights.exists():
            weights.symlink_to(real_file)
        what = f"pytorch-fid's real weights file {real_file}"
    else:
        self_made_fid_weights(weights)
        what = "SELF-MADE weights file (FID Inception, seeded random init, pytorch-fid's state-dict format)"
    digest = sha256_of(weights)
    setup = dataclasses.replace(setup, weights=dataclasses.replace(setup.weights, sha256=digest))
    print(f"weights: {what}; sha256 {digest}; read by both tools from {weights}")
    n_real = len(list(real_dir.glob("*.png")))
    n_gen = len(list(gen_dir.glob("*.png")))
    t = time.perf_counter()
    ex = build_extractor(setup, weights_dir=weights.parent, allow_download=False, allow_random=False)
    fd, _ = _run([ex], _source(real_dir, n_real), _source(gen_dir, n_gen), device, batch_size=batch_size)
    t_ours = time.perf_counter() - t
    ours = fd["inception_tf"]
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    cmd = [
        sys.executable,
        "-m",
        "pytorch_fid",
        str(gen_dir),
        str(real_dir),
        "--device",
        str(device),
        "--dims",
        "2048",
        "--batch-size",
        str(batch_size),
    ]
    print(f"# running {' '.join(cmd[1:])} (its progress bar below)", flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr (tqdm) passes through
    t_ref = time.perf_counter() - t
    if out.returncode != 0:
        print(f"pytorch_fid failed with exit code {out.returncode} (its messages are above)")
        return
    ref = float(out.stdout.strip().split()[-1])
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pytorch_fid.fid_score"], check=True, env=env)
    t_start = time.perf_counter() - t
    n = n_real + n_gen
    print(f"images: {n_gen} generated + {n_real} real, 299x299 grey PNG; batch {batch_size}; device {device}")
    print(
        f"fidmed (in-process: build + load weights + both sets + FD): FD {ours:.10g}, {t_ours:.1f} s, "
        f"{n / t_ours:.2f} img/s"
    )
    print(
        f"python -m pytorch_fid (whole command; its Python start-up + imports alone take {t_start:.1f} s): "
        f"FD {ref:.10g}, {t_ref:.1f} s, {n / t_ref:.2f} img/s"
    )
    print(
        f"throughput fidmed / pytorch_fid: {t_ref / t_ours:.2f}x; FD relative difference "
        f"{abs(ours - ref) / abs(ref):.2e} (fidmed route: {'nuclear (n < d)' if min(n_real, n_gen) < 2048 else 'cholesky'})"
    )


def memory_run(args) -> None:
    """One configuration of (e), in a fresh process (peak RSS is per process)."""
    import json
    import resource

    from fidmed.data.phantom import PhantomDataset
    from fidmed.evaluation.evaluator import Evaluator
    from fidmed.evaluation.sources import DatasetSource, GeneratorSource
    from fidmed.gan.networks import build_networks

    device = torch.device(args.device)
    from omegaconf import OmegaConf

    from fidmed.config import StyleGAN2
    from fidmed.gan.module import network_kwargs

    model = OmegaConf.structured(StyleGAN2)  # model=stylegan2: the study's networks
    res = args.mem_resolution
    G = build_networks(**network_kwargs(model, res, 1))[0].eval().to(device)
    real = DatasetSource(PhantomDataset(args.mem_real, res, seed=0, num_workers=os.cpu_count() or 1))
    exs = _extractors(args.extractor, args.weights_dir, args.input_size)
    ev = Evaluator(exs, real, device=device, batch_size=args.batch_size, metrics=args.memory_run.split(","))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    ev.evaluate(GeneratorSource(G, args.mem_num, device=device))
    out = {
        "metrics": args.memory_run,
        "seconds": time.perf_counter() - t,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print("MEMORY " + json.dumps(out))


def section_e(args) -> None:
    import json

    print(
        f"\n## (e) peak memory: {args.mem_num} generated (random-init StyleGAN2, {args.mem_resolution} px) vs "
        f"{args.mem_real} "
        f"real phantoms, extractors {' '.join(args.extractor)}, device {args.device}, batch {args.batch_size}"
    )
    for metrics in args.mem_metrics:
        cmd = [
            sys.executable,
            __file__,
            "--memory-run",
            metrics,
            "--mem-num",
            str(args.mem_num),
            "--mem-real",
            str(args.mem_real),
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            "--mem-resolution",
            str(args.mem_resolution),
            "--extractor",
            *args.extractor,
        ]
        cmd += ["--weights-dir", args.weights_dir] if args.weights_dir else []
        cmd += ["--input-size", str(args.input_size)] if args.input_size else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("MEMORY ")]
        if out.returncode != 0 or not lines:
            print(f"metrics {metrics}: FAILED\n{out.stderr[-2000:]}")
            continue
        rec = json.loads(lines[-1][len("MEMORY ") :])
        cuda = f", peak CUDA allocated {rec['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in rec else ""
        print(f"metrics {metrics}: peak RSS {rec['peak_rss_gib']:.2f} GiB{cuda}, {rec['seconds']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real"), ap.add_argument("--gen")
    ap.add_argument("--extractor", nargs="+", default=None, help="default: experiment=paper's eleven")
    ap.add_argument("--num", type=int, default=16, help="images per set for (a), (b), (d)")
    ap.add_argument("--parity-num", type=int, default=2000, help="images per set for (c)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="(b): interleaved repeats, median reported")
    ap.add_argument("--parity-batch-size", type=int, default=50, help="(c): pytorch_fid's default batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--workdir", default=None, help="folder for generated images and weights (default: temporary)")
    ap.add_argument("--mem-num", type=int, default=50000, help="(e): generated images")
    ap.add_argument("--mem-real", type=int, default=10000, help="(e): real images")
    ap.add_argument("--mem-resolution", type=int, default=256, help="(e): generator resolution")
    ap.add_argument(
        "--mem-metrics", nargs="+", default=["fd,rfd", "fd,rfd,prdc"], help="(e): metric sets, one process each"
    )
    ap.add_argument("--input-size", type=int, default=None, help="override the extractors' input size (checks)")
    ap.add_argument("--out", type=Path, default=None, help="also write everything printed to this Markdown file")
    ap.add_argument("--memory-run", default=None, help=argparse.SUPPRESS)  # (e)'s child process
    ap.add_argument("--only", nargs="*", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d", "e"])
    args = ap.parse_args()
    args.extractor = args.extractor or study_extractors()
    if args.memory_run:
        return memory_run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as out, contextlib.redirect_stdout(_Tee(sys.stdout, out)):
            print(f"<!-- python benchmarks/evaluate.py {' '.join(sys.argv[1:])} -->\n```text")
            try:
                run_sections(args)
            finally:
                print("```")
        return None
    return run_sections(args)


class _Tee:
    """Write to several streams (the console and the --out file)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def run_sections(args) -> None:
    from benchmarks.machine import cpu_name

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fidmed-bench-"))
    device = torch.device(args.device)
    print(
        f"# machine: {cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    if set(args.only) & {"a", "b", "d"}:
        real_dir = Path(args.real) if args.real else phantom_folder(work / f"real{args.num}", args.num, 0)
        gen_dir = Path(args.gen) if args.gen else phantom_folder(work / f"gen{args.num}", args.num, 1, blur=1.0)
        real, gen = _source(real_dir, args.num), _source(gen_dir, args.num)
        exs = _extractors(args.extractor, args.weights_dir, args.input_size)
        print(f"# N = {args.num} real / {args.num} gen, {real.dataset.resolution} px; real={real_dir} gen={gen_dir}")
        for ex in exs:
            print(f"#   {ex.name}: {ex.preprocessing.key}, weights {ex.weights_label}")
        if "a" in args.only:
            print("\n## (a) bf16 vs fp32 FD")
            fp32, _ = _run(exs, real, gen, device, batch_size=args.batch_size)
            bf16, _ = _run(exs, real, gen, device, "bf16", batch_size=args.batch_size)
            for ex in exs:
                tag = " RANDOM-INIT (plumbing only)" if ex.random_init else ""
                rel = abs(bf16[ex.name] - fp32[ex.name]) / abs(fp32[ex.name])
                print(f"{ex.name:>24}: FD fp32 {fp32[ex.name]:.6f}  bf16 {bf16[ex.name]:.6f}  rel.dev {rel:.2e}{tag}")
        if {"b", "d"} & set(args.only):
            section_b_d(exs, real, gen, device, args.batch_size, "b" in args.only, "d" in args.only, args.repeats)
    if "c" in args.only:
        n = args.parity_num
        real_dir = phantom_folder(work / f"parity_real{n}", n, 0, size=299)
        gen_dir = phantom_folder(work / f"parity_gen{n}", n, 1, size=299, blur=1.0)
        section_c(real_dir, gen_dir, device, args.parity_batch_size, work)
    if "e" in args.only:
        section_e(args)


if __name__ == "__main__":
    main()
