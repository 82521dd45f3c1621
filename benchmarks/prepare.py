"""Throughput of `fidmed prepare` (slices/s per preparer) and of the training data loader (images/s).

    python benchmarks/prepare.py [--workers 1 2] [--loader-images 1024] [--batches 40]
                                 [--out benchmarks/results/prepare.md] [--keep DIR]

Part 1 writes synthetic raw datasets in the real formats (sizes in the table; slice content = fidmed's CT-like
phantoms, so PNG/gzip compression behaves like real images) and times :func:`run_prepare` on each with every
``--workers`` value, from an empty output folder: wall-clock seconds including the worker processes' start-up
(spawn, which imports torch through ``fidmed.data``), so small runs under-state the steady-state rate; the start-up
alone is timed too. Sources are the unit of parallelism (one volume, one PNG, one DICOM series). ``workers = 1``
converts in this process: the per-core rate.

Part 2 writes ``--loader-images`` 8-bit PNGs at 256x256 and at 512x512 (and a quarter as many at 1024x1024,
decoded on the fly only, as conf/modality/xray.yaml does) and times the training loader
(:class:`fidmed.data.datamodule.ImageDataModule`, batch 32, x-flip on, infinite sampler) for each cache mode of
:class:`fidmed.data.folder.ImageFolderDataset` (``none`` = decode PNGs in the loader; ``memory``; ``disk`` =
decoded once into an .npy and memory-mapped) and DataLoader worker count: images/s over ``--batches`` batches
after 3 warm-up batches (the disk cache's one-off build is timed separately). The consumption it must keep up
with is quoted from stylegan2-ada-pytorch's README ("Expected training time", --cfg stylegan2 on V100s).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py

from machine import cpu_name  # noqa: E402

from fidmed.data.phantom import render_phantoms  # noqa: E402
from fidmed.data.prepare import CardiacPreparer, CTPreparer, DicomPreparer, MRIPreparer, XrayPreparer, run_prepare  # noqa: E402

# stylegan2-ada-pytorch README, "Expected training time" (--cfg stylegan2, NVIDIA V100s): sec/kimg, lower end.
PUBLISHED_SEC_PER_KIMG = {256: {1: 21.6, 8: 4.4}, 512: {1: 72.5, 8: 9.5}, 1024: {1: 154.3, 8: 20.2}}


def phantoms(n: int, res: int, seed: int) -> np.ndarray:
    """uint8 [n, res, res] CT-like slices."""
    images = np.asarray(render_phantoms(n, res, seed=seed))
    return images.reshape(n, res, res)


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 [n, h, w] to (height, width) with PIL."""
    return np.stack(
        [np.asarray(PIL.Image.fromarray(im).resize((size[1], size[0]), PIL.Image.BILINEAR)) for im in images]
    )


# -- part 1: synthetic raw datasets -----------------------------------------------------------------------------


def make_xray(root: Path, n: int) -> str:
    root.mkdir(parents=True)
    base = resize(phantoms(n, 256, 1), (1024, 1024))
    for i, image in enumerate(base):
        if i % 4 == 3:  # every 4th file RGBA, as about 1,000 of ChestX-ray14's are
            rgba = np.dstack([image, image, image, np.full_like(image, 255)])
            PIL.Image.fromarray(rgba, "RGBA").save(root / f"{i:08d}_000.png")
        else:
            PIL.Image.fromarray(image, "L").save(root / f"{i:08d}_000.png")
    return f"{n} PNGs 1024x1024 (1 in 4 RGBA)"


def make_ct(root: Path, volumes: int, depth: int) -> str:
    import SimpleITK as sitk

    root.mkdir(parents=True)
    for v in range(volumes):
        vol = phantoms(depth, 512, 10 + v).astype(np.int16) * 8 - 1024
        image = sitk.GetImageFromArray(vol)
        image.SetSpacing((0.7, 0.7, 2.5))
        sitk.WriteImage(image, str(root / f"liver-orig{v:03d}.mhd"))
    return f"{volumes} MetaImage volumes 512x512x{depth} int16"


def make_mri(root: Path, volumes: int, depth: int) -> str:
    import nibabel as nib

    root.mkdir(parents=True)
    for v in range(volumes):
        slices = phantoms(depth, 256, 20 + v)[:, 8:248, 8:248].astype(np.float32)  # [z, y, x], 240x240
        data = np.stack([slices * (s + 1) for s in range(4)], axis=-1).transpose(2, 1, 0, 3)  # x, y, z, seq
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.eye(4)), str(root / f"BRATS_{v:03d}.nii.gz"))
    return f"{volumes} 4-D NIfTI 240x240x{depth}x4 float32 (.nii.gz)"


def make_cardiac(root: Path, patients: int, depth: int, frames: int) -> str:
    import nibabel as nib

    for p in range(patients):
        folder = root / f"patient{p + 1:03d}"
        folder.mkdir(parents=True)
        base = resize(phantoms(depth, 256, 30 + p), (216, 256)).astype(np.int16)  # [z, 216 rows, 256 cols]
        data = np.stack([np.roll(base, t, axis=2) for t in range(frames)], axis=-1).transpose(2, 1, 0, 3)
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(data), np.diag([1.4, 1.4, 10.0, 1.0])),
            str(folder / f"patient{p + 1:03d}_4d.nii.gz"),
        )
    return f"{patients} 4-D NIfTI 256x216x{depth}x{frames} int16 (.nii.gz; frame 0 used)"


def make_dicom(root: Path, slices: int) -> str:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root.mkdir(parents=True)
    series = generate_uid()
    for k, image in enumerate(phantoms(slices, 512, 40)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(root / f"IM{k:04d}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "B", "CT", series, 1, k
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0.0, 0.0, 2.5 * k]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 512, 512, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (image.astype(np.uint16) * 8).tobytes()
        ds.save_as(str(root / f"IM{k:04d}"), enforce_file_format=True)
    return f"1 series of {slices} DICOM files 512x512 uint16"


def worker_startup_seconds(workers: int) -> float:
    """Wall time until ``workers`` spawned processes, set up as run_prepare's (importing fidmed.data.prepare),
    have each answered once."""
    import concurrent.futures as cf
    import multiprocessing

    from fidmed.data.prepare import pixels, runner

    start = time.perf_counter()
    with cf.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=runner._init_worker
    ) as pool:
        list(pool.map(pixels.to_uint8, [np.zeros(1, np.float32)] * workers))
    return time.perf_counter() - start


def prepare_rows(work: Path, workers_list: list[int], scale: int) -> list[str]:
    cases = [
        ("xray", XrayPreparer(), lambda p: make_xray(p, 12 * scale)),
        ("ct", CTPreparer(), lambda p: make_ct(p, 2, 16 * scale)),
        ("mri", MRIPreparer(), lambda p: make_mri(p, 2, 24 * scale)),
        ("cardiac", CardiacPreparer(), lambda p: make_cardiac(p, 2 * scale, 10, 20)),
        ("dicom", DicomPreparer(), lambda p: make_dicom(p, 24 * scale)),
    ]
    startup = {w: worker_startup_seconds(w) for w in workers_list if w > 1}
    rows = [
        "| preparer | synthetic input | workers | sources | slices read | images written | seconds | slices/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, preparer, make in cases:
        src = work / "raw" / name
        t0 = time.perf_counter()
        what = make(src)
        print(f"{name}: wrote {what} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for workers in workers_list:
            out = work / "out" / f"{name}-{workers}"
            start = time.perf_counter()
            report = run_prepare(preparer, src, out, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            counts = report.manifest["counts"]
            seen = counts.get("slices", counts["images"])  # xray: one image per file
            rows.append(
                f"| {name} | {what} | {workers} | {counts.get('sources_ok', 0)} | {seen} | {counts['images']} |"
                f" {seconds:.2f} | {seen / seconds:.1f} |"
            )
            print(rows[-1], file=sys.stderr)
            shutil.rmtree(out)
    for workers, seconds in startup.items():
        rows.append(
            f"| (worker start-up alone) | spawn {workers} processes, import fidmed.data.prepare | {workers} |"
            f" | | | {seconds:.2f} | |"
        )
    return rows


# -- part 2: the training loader --------------------------------------------------------------------------------


def headroom_rows(rates: dict[tuple[int, str], float]) -> list[str]:
    """Measured loader rate over the quoted 8-V100 consumption, per resolution and cache mode (best worker count)."""
    rows = ["| resolution | cache | best images/s here | x 8-V100 consumption |", "|---:|---|---:|---:|"]
    for (res, cache), rate in sorted(rates.items()):
        need = 1000 / PUBLISHED_SEC_PER_KIMG[res][8]
        rows.append(f"| {res} | {cache} | {rate:.0f} | {rate / need:.1f} |")
    return rows


def loader_rows(work: Path, n: int, batches: int, rates: dict[tuple[int, str], float]) -> list[str]:
    import torch

    from fidmed.data.datamodule import ImageDataModule
    from fidmed.data.folder import ImageFolderDataset

    rows = [
        "| resolution | images | cache | DataLoader workers | build (s) | images/s |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    all_modes = (("none", (0, 2)), ("memory", (0,)), ("disk", (0, 2)))
    # 1024 (ChestX-ray14, too large to cache: conf/modality/xray.yaml has cache none): on-the-fly decoding only.
    for res, count, modes in ((256, n, all_modes), (512, n, all_modes), (1024, max(64, n // 4), all_modes[:1])):
        folder = work / f"loader{res}"
        folder.mkdir(parents=True)
        for i, image in enumerate(phantoms(count, res, 50)):
            PIL.Image.fromarray(image, "L").save(folder / f"{i:06d}.png")
        for cache, worker_counts in modes:
            start = time.perf_counter()
            dataset = ImageFolderDataset(folder, cache=cache, cache_dir=work / f"cache{res}")
            build = time.perf_counter() - start
            runs = [(w, None) for w in worker_counts]
            if cache == "memory":  # in-process collation with torch's default thread count (= cores)
                runs.append((0, os.cpu_count() or 1))
            for workers, threads in runs:
                saved = torch.get_num_threads()
                if threads is not None:
                    torch.set_num_threads(threads)
                module = ImageDataModule(dataset, batch_size=32, num_workers=workers, xflip=True, seed=0)
                it = iter(module.train_dataloader())
                for _ in range(3):
                    next(it)
                start = time.perf_counter()
                total = 0
                for _ in range(batches):
                    total += next(it).shape[0]
                rate = total / (time.perf_counter() - start)
                del it
                torch.set_num_threads(saved)
                label = f"{workers}" + (f" (torch threads {threads})" if threads is not None else "")
                rates[(res, cache)] = max(rates.get((res, cache), 0.0), rate)
                rows.append(f"| {res} | {count} | {cache} | {label} | {build:.2f} | {rate:.0f} |")
                print(rows[-1], file=sys.stderr)
        assert torch.is_tensor(dataset[0])
    return rows


def machine_info() -> list[str]:
    cpu = cpu_name()
    import SimpleITK as sitk

    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores",
        f"- Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"SimpleITK {sitk.Version_VersionString()}, {platform.platform()}",
    ]
    if hasattr(os, "getloadavg"):
        lines.append(
            "- load average at start (1, 5, 15 min): "
            + ", ".join(f"{v:.2f}" for v in os.getloadavg())
            + " (other jobs share the machine when this exceeds the core count)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, min(2, os.cpu_count() or 1)])
    parser.add_argument("--scale", type=int, default=2, help="multiplies the synthetic datasets' sizes")
    parser.add_argument("--loader-images", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "prepare.md"))
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, deleted)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of this process (collation with DataLoader workers = 0)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    workers = sorted(set(args.workers))

    info = machine_info()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fidmed-bench-prepare-"))
    try:
        part1 = prepare_rows(work, workers, args.scale)
        rates: dict[tuple[int, str], float] = {}
        part2 = loader_rows(work, args.loader_images, args.batches, rates)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    consumption = ["| resolution | 1 V100: s/kimg -> images/s | 8 V100s: s/kimg -> images/s |", "|---:|---:|---:|"]
    for res, table in PUBLISHED_SEC_PER_KIMG.items():
        consumption.append(f"| {res} | {table[1]} -> {1000 / table[1]:.0f} | {table[8]} -> {1000 / table[8]:.0f} |")
    command = "python benchmarks/prepare.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Dataset preparation and loading throughput",
            "",
            f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d')})",
            "",
            *info,
            "",
            "## `fidmed prepare`: slices per second on synthetic volumes",
            "",
            "Wall clock from an empty output folder, including worker start-up (spawn; timed alone in the last row). "
            "`workers = 1` converts in this process (the per-core rate); a run uses at most one worker per source. "
            "`slices read` counts every slice examined (mri: before the >15% filter, cardiac: frame 0), `images "
            "written` the PNGs. slices/s = slices read / seconds.",
            "",
            *part1,
            "",
            "## Training loader: images per second (batch 32, x-flip, infinite sampler)",
            "",
            f"Phantom PNGs; {args.batches} timed batches after 3 warm-up batches (the infinite sampler repeats epochs); "
            "`build` = constructing the dataset (header scan, plus decoding for memory/disk). With 0 DataLoader workers "
            f"the batches are collated in this process, with torch's intra-op threads = {args.threads} unless the row "
            "says otherwise (DataLoader workers always use 1).",
            "",
            *part2,
            "",
            "## What training consumes (quoted, not measured here)",
            "",
            "stylegan2-ada-pytorch README, 'Expected training time', --cfg stylegan2 on NVIDIA V100s (fastest of the "
            "quoted range):",
            "",
            *consumption,
            "",
            "Headroom: the best loader rate measured here (one process or two workers on this machine) over what 8 V100s "
            "consume at that resolution; above 1 the loader keeps up.",
            "",
            *headroom_rows(rates),
            "",
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
