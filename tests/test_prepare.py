"""`fidmed prepare`: each preparer against a direct numpy computation of the study's steps on synthetic volumes
written in the real formats (SimpleITK MetaImage, nibabel NIfTI, pydicom DICOM, PIL PNG), bad input, the
runner's resume/idempotency/manifest properties, the real sample files shipped in the pydicom and nibabel wheels,
the CLI and the modality configs.

Expected pixels are computed here from the study's scripts (github.com/mckellwoodland/fid-med-eval, utils/
prepare_*.py) written out in numpy, never by calling the preparers' helpers.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from fidmed.data.folder import ImageFolderDataset  # noqa: E402
from fidmed.data.prepare import CardiacPreparer, CTPreparer, DicomPreparer, MRIPreparer, XrayPreparer, run_prepare  # noqa: E402
from fidmed.data.prepare import output as prepare_output  # noqa: E402
from fidmed.data.prepare import pixels as prepare_pixels  # noqa: E402
from fidmed.data.prepare import runner as prepare_runner  # noqa: E402
from fidmed.data.prepare.cli import add_prepare_parser  # noqa: E402
from fidmed.errors import ConfigError, DataError  # noqa: E402


def run(preparer, src, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return run_prepare(preparer, src, out, **kw)


def png(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def outputs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: png(p) for p in sorted(out.glob("*.png"))}


def study_pad(pad: int) -> tuple[int, int]:
    """The study's pad_image split, written out: even halves; odd p -> (p//2 - 1, p//2 + 1), i.e. p - 1 in all."""
    return (pad // 2, pad // 2) if pad % 2 == 0 else (pad // 2 - 1, pad // 2 + 1)


def msd_pad(pad: int) -> tuple[int, int]:
    """fidmed's MSD padding: the study's split, with the pixel it leaves out added at the end."""
    before = max(study_pad(pad)[0], 0)
    return before, pad - before


# == xray ======================================================================================================


def _luma_pil(rgb: np.ndarray) -> np.ndarray:
    """PIL's RGB->L: ITU-R 601-2 luma in 16-bit fixed point, (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
    (Pillow's Convert.c; 19595/65536 = 0.299, 38470/65536 = 0.587, 7471/65536 = 0.114)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def test_xray_grey_rgba_16bit_truncated(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "raw"
    (src / "images_001" / "images").mkdir(parents=True)
    (src / "images_002" / "images").mkdir(parents=True)
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    odd = rng.integers(0, 256, (17, 29), dtype=np.uint8)  # odd shape: kept as it is (the study does not resize)
    deep = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    PIL.Image.fromarray(grey, "L").save(src / "images_001" / "images" / "00000001_000.png")
    PIL.Image.fromarray(rgba, "RGBA").save(src / "images_001" / "images" / "00000002_000.png")
    PIL.Image.fromarray(odd, "L").save(src / "images_002" / "images" / "00000003_000.png")
    PIL.Image.fromarray(deep).save(src / "images_002" / "images" / "00000004_000.png")
    full = (src / "images_001" / "images" / "00000001_000.png").read_bytes()
    (src / "images_002" / "images" / "00000005_000.png").write_bytes(full[: len(full) // 2])  # truncated
    (src / "images_002" / "images" / "._00000001_000.png").write_bytes(b"\0" * 10)  # macOS junk: ignored
    with PIL.Image.open(src / "images_002" / "images" / "00000004_000.png") as deep_file:
        assert deep_file.mode.startswith("I")  # a 16-bit PNG

    report = run(XrayPreparer(), src, tmp_path / "out")
    got = outputs(tmp_path / "out")
    assert sorted(got) == ["00000001_000.png", "00000002_000.png", "00000003_000.png"]
    np.testing.assert_array_equal(got["00000001_000.png"], grey)
    np.testing.assert_array_equal(got["00000002_000.png"], _luma_pil(rgba[..., :3]))  # alpha ignored
    np.testing.assert_array_equal(got["00000003_000.png"], odd)
    skipped = {s["source"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"images_002/images/00000004_000.png", "images_002/images/00000005_000.png"}
    assert "16/32-bit" in skipped["images_002/images/00000004_000.png"]
    assert "00000005_000.png" in skipped["images_002/images/00000005_000.png"]
    assert report.manifest["counts"]["sources_bad"] == 2 and report.num_images == 3

    # --high-depth rescale: per-image min-max in float64, rounded
    report = run(XrayPreparer(high_depth="rescale"), src, tmp_path / "out16")
    d = deep.astype(np.float64)
    np.testing.assert_array_equal(
        png(tmp_path / "out16" / "00000004_000.png"),
        np.rint((d - d.min()) * 255.0 / (d.max() - d.min())).astype(np.uint8),
    )
    # --strict stops at the truncated file and names it
    with pytest.raises(DataError, match="00000004_000.png|00000005_000.png"):
        run(XrayPreparer(), src, tmp_path / "strict", strict=True)


# == ct ========================================================================================================


def _write_mhd(path: Path, array: np.ndarray, spacing=(0.7, 0.7, 2.5)) -> None:
    image = sitk.GetImageFromArray(array)  # array [z, y, x]
    image.SetSpacing(spacing[: array.ndim])
    sitk.WriteImage(image, str(path))


def _study_ct_slice(s: np.ndarray) -> np.ndarray:
    """prepare_sliver07.py's convert_range(slice, min, max, 0, 255) in numpy, integer slices in float64."""
    s = s.astype(np.float64) if np.issubdtype(s.dtype, np.integer) else s
    return (s - s.min()) * (255.0 - 0.0) / (s.max() - s.min()) + 0.0


def test_ct_per_slice_minmax_constant_nan_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "scan"
    src.mkdir()
    vol = rng.integers(-1024, 3072, (6, 13, 17)).astype(np.int16)  # odd, non-square slices
    vol[3] = -1000  # constant slice
    volf = (rng.standard_normal((3, 11, 11)) * 300).astype(np.float32)
    nan = volf.copy()
    nan[1, 2, 3] = np.nan
    _write_mhd(src / "liver-orig001.mhd", vol)
    _write_mhd(src / "liver-orig002.mhd", volf)
    _write_mhd(src / "liver-orig003.mhd", nan)
    _write_mhd(src / "liver-orig004.mhd", vol[0])  # 2-D
    _write_mhd(src / "liver-orig005.mhd", vol)
    raw = src / "liver-orig005.raw"
    raw.write_bytes(raw.read_bytes()[:500])  # truncated data file

    report = run(CTPreparer(), src, tmp_path / "out")
    got = outputs(tmp_path / "out")
    expected = {f"liver-orig001_{i}.png": np.rint(_study_ct_slice(vol[i])).astype(np.uint8) for i in range(6) if i != 3}
    expected.update({f"liver-orig002_{i}.png": np.rint(_study_ct_slice(volf[i])).astype(np.uint8) for i in range(3)})
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    assert got["liver-orig001_0.png"].shape == (13, 17)
    reasons = {(s["source"], s["where"]): s["reason"] for s in report.skipped}
    assert "constant" in reasons[("liver-orig001.mhd", "slice 3")]
    assert "NaN" in reasons[("liver-orig003.mhd", None)]
    assert "3-D" in reasons[("liver-orig004.mhd", None)] or "2-D" in reasons[("liver-orig004.mhd", None)]
    assert "liver-orig005" in reasons[("liver-orig005.mhd", None)]
    counts = report.manifest["counts"]
    assert (counts["slices"], counts["skipped_constant"], counts["images"], counts["sources_bad"]) == (9, 1, 8, 3)
    assert report.manifest["image_sizes"] == [
        {"height": 11, "width": 11, "count": 3},
        {"height": 13, "width": 17, "count": 5},
    ]

    # constant="zero" writes the constant slice black; quantize="floor" truncates
    run(CTPreparer(constant="zero", quantize="floor"), src, tmp_path / "out2")
    np.testing.assert_array_equal(png(tmp_path / "out2" / "liver-orig001_3.png"), np.zeros((13, 17), np.uint8))
    np.testing.assert_array_equal(
        png(tmp_path / "out2" / "liver-orig001_0.png"), np.floor(_study_ct_slice(vol[0])).astype(np.uint8)
    )


def test_ct_slice_range_beyond_int16(tmp_path):
    """The study's formula on SimpleITK's int16 array is exact while max - min <= 32767 and wraps around beyond;
    fidmed computes in float64: the study's values up to that range, the true min-max beyond it."""
    src = tmp_path / "scan"
    src.mkdir()
    vol = np.zeros((2, 8, 8), np.int16)
    vol[0] = np.linspace(-1024, 31743, 64).round().reshape(8, 8)  # range 32767: the largest exact one
    vol[1] = np.linspace(-1024, 32767, 64).round().reshape(8, 8)  # range 33791: wraps in int16
    _write_mhd(src / "liver-orig001.mhd", vol)
    run(CTPreparer(), src, tmp_path / "out")
    with np.errstate(over="ignore"):
        study = [(s - s.min()) * (255.0 - 0.0) / (s.max() - s.min()) + 0.0 for s in vol]  # int16 arithmetic
    np.testing.assert_array_equal(study[0], _study_ct_slice(vol[0]))  # exact: equal to the float64 computation
    assert study[1].min() < 0 and study[1].max() > 255  # wrapped: outside [0, 255]
    for i in range(2):
        np.testing.assert_array_equal(
            png(tmp_path / "out" / f"liver-orig001_{i}.png"), np.rint(_study_ct_slice(vol[i])).astype(np.uint8)
        )


# == mri =======================================================================================================


def _nifti(path: Path, data: np.ndarray) -> None:
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    image.header.set_data_dtype(data.dtype)
    nib.save(image, str(path))


def _brain(rng, shape_xyz, seqs, dtype):
    """Zero background plus a disc whose size varies with z, so that slices fall on both sides of 15%, and whose
    brightness varies with z, so that volume-wise and slice-wise rescaling differ."""
    nx, ny, nz = shape_xyz
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    data = np.zeros((nx, ny, nz, seqs), dtype=np.float64)
    for z in range(nz):
        radius = 20 + 30 * z  # area pi r^2 / 256^2: 0.03, 0.17, 0.44, 0.85 ...
        inside = (x - nx / 2) ** 2 + (y - ny / 2) ** 2 < radius**2
        for s in range(seqs):
            data[..., z, s] = np.where(inside, rng.uniform(10, 1000 * (s + 1), (nx, ny)) * (1 + z), 0)
    return data.astype(dtype)


def _itk_rescale(volume: np.ndarray) -> np.ndarray:
    """ITK RescaleIntensityImageFilter to [0, 255]: scale = 255/(max-min), shift = 0 - min*scale, output =
    static_cast<pixel type>(double(x)*scale + shift) (truncation for integer types)."""
    low, high = float(volume.min()), float(volume.max())
    scale = 255.0 / (high - low) if high != low else (255.0 / high if high != 0 else 0.0)
    shift = 0.0 - low * scale
    out = volume.astype(np.float64) * scale + shift
    if np.issubdtype(volume.dtype, np.integer):
        out = np.trunc(out)
    return out.astype(volume.dtype)


def _study_msd(
    data_xyzs: np.ndarray, seqs, per_slice=False, pad_to=256, thresh=0.15, prefix="BRATS_001"
) -> dict[str, np.ndarray]:
    out = {}
    for s in seqs:
        vol = np.ascontiguousarray(data_xyzs[..., s].transpose(2, 1, 0))  # [z, y, x] as SimpleITK arrays
        vol = np.stack([_itk_rescale(v) for v in vol]) if per_slice else _itk_rescale(vol)
        for i, slab in enumerate(vol):
            h, w = slab.shape
            padded = np.pad(slab, (msd_pad(pad_to - h), msd_pad(pad_to - w)))
            assert padded.shape == (pad_to, pad_to)
            if (padded > 0).sum() / (padded > -1).sum() > thresh:
                out[f"{prefix}_{s}_{i}.png"] = np.rint(padded.astype(np.float64)).astype(np.uint8)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_mri_volume_rescale_pad_filter(tmp_path, dtype):
    rng = np.random.default_rng(2)
    src = tmp_path / "imagesTr"
    src.mkdir()
    data = _brain(rng, (239, 236, 4), 4, dtype)  # odd column padding (17): 7 left, 10 right
    _nifti(src / "BRATS_001.nii.gz", data)
    (src / "._BRATS_001.nii.gz").write_bytes(b"\0" * 100)  # the MSD archive's macOS files: ignored
    report = run(MRIPreparer(), src, tmp_path / "out")
    expected = _study_msd(data, range(4))
    got = outputs(tmp_path / "out")
    assert sorted(got) == sorted(expected) and len(expected) < 16  # some slices filtered, some kept
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    assert report.manifest["counts"]["slices"] == 16
    assert report.manifest["counts"]["filtered_nonzero"] == 16 - len(expected)


def test_mri_slice_rescale_option_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "imagesTr"
    src.mkdir()
    data = _brain(rng, (240, 241, 3), 4, np.float32)  # odd row padding (15): 6 top, 9 bottom
    _nifti(src / "BRATS_001.nii.gz", data)
    _nifti(src / "BRATS_002.nii.gz", data[..., 0])  # 3-D where 4-D is expected (a label file, say)
    _nifti(src / "BRATS_003.nii.gz", data[..., :2])  # only 2 sequences
    nan = data.copy()
    nan[120, 120, 1, 3] = np.nan  # inside the brain
    nan[100, 130, 2, 1] = np.inf
    _nifti(src / "BRATS_004.nii.gz", nan)
    # truncated: SimpleITK itself reads it without an error, zero-filling the missing voxels
    (src / "BRATS_005.nii.gz").write_bytes((src / "BRATS_001.nii.gz").read_bytes()[:2000])
    int_data = (data * 2).astype(np.int16)
    _nifti(src / "BRATS_006.nii.gz", int_data)
    (src / "BRATS_006.nii.gz").write_bytes((src / "BRATS_006.nii.gz").read_bytes()[:-3000])  # truncated, integer
    _nifti(src / "BRATS_007.nii", int_data)
    (src / "BRATS_007.nii").write_bytes((src / "BRATS_007.nii").read_bytes()[:-3000])  # truncated, uncompressed
    report = run(MRIPreparer(rescale="slice", sequences=(1, 3)), src, tmp_path / "out")
    zeroed = np.where(np.isfinite(nan), nan, 0).astype(np.float32)  # what SimpleITK's NIfTI reader makes of them
    expected = {**_study_msd(data, (1, 3), per_slice=True), **_study_msd(zeroed, (1, 3), True, prefix="BRATS_004")}
    got = outputs(tmp_path / "out")
    assert sorted(got) == sorted(expected) and expected
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    reasons = {s["source"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {f"BRATS_00{k}.nii.gz" for k in (2, 3, 4, 5, 6)} | {"BRATS_007.nii"}
    assert "3-D" in reasons["BRATS_002.nii.gz"] and "BRATS_002.nii.gz" in reasons["BRATS_002.nii.gz"]
    assert "2 sequence" in reasons["BRATS_003.nii.gz"]
    assert "2 NaN/infinite voxel(s), read as 0" in reasons["BRATS_004.nii.gz"]
    assert "BRATS_005.nii.gz" in reasons["BRATS_005.nii.gz"]
    assert "BRATS_006.nii.gz is truncated" in reasons["BRATS_006.nii.gz"]
    assert "BRATS_007.nii is truncated" in reasons["BRATS_007.nii"]
    assert report.manifest["counts"]["sources_bad"] == 5  # BRATS_004 was used
    # nan="skip" refuses the NaN file instead
    report = run(MRIPreparer(sequences=(1,), nan="skip"), src, tmp_path / "skip")
    assert not list((tmp_path / "skip").glob("BRATS_004_*"))
    assert "NaN" in {s["source"]: s["reason"] for s in report.skipped}["BRATS_004.nii.gz"]


def test_mri_odd_padding_changes_the_15_percent_decision(tmp_path):
    """An odd padding: the study's slice is one column short (255 wide) and its ratio divides by 255 x 256;
    fidmed's full 256 x 256 slice divides by more, so a slice just above 15% in the study is dropped."""
    src = tmp_path / "imagesTr"
    src.mkdir()
    slices = np.zeros((2, 240, 239), np.float32)  # [z, y, x]: 239 columns, padding 17, the study's split (7, 9)
    for z, nonzero in ((0, 9800), (1, 9840)):  # 9800 / (255 * 256) = 0.1501 > 0.15 >= 9800 / 256**2 = 0.1495
        slices[z].reshape(-1)[:nonzero] = 100.0 + np.arange(nonzero) % 50
    data = np.stack([slices.transpose(2, 1, 0)] * 2, axis=-1)  # [x, y, z, 2 sequences]
    _nifti(src / "BRATS_001.nii.gz", data)
    report = run(MRIPreparer(sequences=(0,)), src, tmp_path / "out")
    vol = _itk_rescale(np.ascontiguousarray(data[..., 0].transpose(2, 1, 0)))  # [z, y, x]
    for z, nonzero in ((0, 9800), (1, 9840)):
        study = np.pad(vol[z], ((8, 8), study_pad(17)))  # the study's padded slice: 256 x 255
        assert study.shape == (256, 255) and (study > 0).sum() == nonzero
        assert (study > 0).sum() / (study > -1).sum() > 0.15  # the study keeps both
    assert sorted(outputs(tmp_path / "out")) == ["BRATS_001_0_1.png"]  # fidmed keeps only the second
    assert report.manifest["counts"]["filtered_nonzero"] == 1


def test_pad_split_matches_the_study():
    for pad in range(0, 40):
        assert prepare_pixels.study_pad_split(pad) == study_pad(pad)
        assert sum(study_pad(pad)) == pad - pad % 2  # the study's odd split pads one pixel less than asked
    from fidmed.data.prepare.mri import pad_msd

    for rows, cols in [(256, 256), (255, 256), (253, 240), (1, 2)]:
        out = pad_msd(np.ones((rows, cols)), 256)
        assert out.shape == (256, 256) and out.sum() == rows * cols


# == cardiac ===================================================================================================


def _study_acdc_slice(slab_yx: np.ndarray, size: int = 256) -> np.ndarray:
    """prepare_ACDC.py written with numpy/scipy: pad to square with the minimum (larger half of an odd row padding
    at the top, of an odd column padding at the right), cubic B-spline (mirror boundary, as ITK's
    BSplineInterpolateImageFunction) sampled at input index i*res/size, then min-max to [0, 255]."""
    from scipy import ndimage

    s = slab_yx.astype(np.float32).astype(np.float64)
    h, w = s.shape
    res = max(h, w)
    l_pad, r_pad = study_pad(res - w)
    t_pad, b_pad = study_pad(res - h)
    square = np.pad(s, ((b_pad, t_pad), (l_pad, r_pad)), constant_values=s.min())  # one short when odd
    ph, pw = square.shape
    rows, cols = np.meshgrid(np.arange(size) * (ph / size), np.arange(size) * (pw / size), indexing="ij")
    resampled = ndimage.map_coordinates(square, [rows, cols], order=3, mode="mirror")
    # outside the image (ITK: continuous index >= size - 0.5): the script's default value 8
    resampled = np.where((rows >= ph - 0.5) | (cols >= pw - 0.5), 8.0, resampled)
    resampled = resampled.astype(np.float32).astype(np.float64)
    return (resampled - resampled.min()) * 255.0 / (resampled.max() - resampled.min())


def _assert_close_uint8(got: np.ndarray, expected_float: np.ndarray, name: str) -> None:
    """ITK and scipy B-splines agree to ~1e-5 (different prefilter initialisations), so a value near .5 may round
    the other way: at most 1 grey level apart, and almost all pixels equal."""
    expected = np.rint(expected_float).astype(np.int64)
    diff = np.abs(got.astype(np.int64) - expected)
    assert diff.max() <= 1, f"{name}: max difference {diff.max()}"
    assert (diff == 0).mean() > 0.995, f"{name}: {(diff != 0).mean():.4f} of the pixels differ"
    # and the float values themselves are close
    assert np.abs(got.astype(np.float64) - expected_float).max() < 0.51


def test_cardiac_frame0_pad_bspline_rescale(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "database" / "training"
    (src / "patient001").mkdir(parents=True)
    (src / "patient002").mkdir(parents=True)
    nx, ny, nz, nt = 150, 131, 3, 2  # odd row padding (19): 10 rows at the top, 8 at the bottom: 149 x 150
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    data = np.zeros((nx, ny, nz, nt), dtype=np.int16)
    for z in range(nz):
        for t in range(nt):
            blob = 800 * np.exp(-((x - 60 - 5 * z) ** 2 + (y - 70 + 7 * t) ** 2) / 400.0)
            data[..., z, t] = (blob + rng.integers(0, 60, (nx, ny))).astype(np.int16)
    data[..., 2, 0] = 17  # a constant slice in frame 0
    image = nib.Nifti1Image(data, np.diag([1.5625, 1.5625, 10.0, 1.0]))
    nib.save(image, str(src / "patient001" / "patient001_4d.nii.gz"))
    nib.save(nib.Nifti1Image(data[..., 0, 0], np.eye(4)), str(src / "patient001" / "patient001_frame01.nii.gz"))
    nib.save(nib.Nifti1Image(data[..., 0], np.eye(4)), str(src / "patient002" / "patient002_4d.nii.gz"))  # 3-D

    report = run(CardiacPreparer(), tmp_path / "database", tmp_path / "out")
    got = outputs(tmp_path / "out")
    assert sorted(got) == ["patient001_4d_0_0.png", "patient001_4d_0_1.png"]
    for j in range(2):
        _assert_close_uint8(got[f"patient001_4d_0_{j}.png"], _study_acdc_slice(data[:, :, j, 0].T), f"slice {j}")
    reasons = {(s["source"], s["where"]): s["reason"] for s in report.skipped}
    assert "constant" in reasons[("training/patient001/patient001_4d.nii.gz", "frame 0 slice 2")]
    assert "3-D" in reasons[("training/patient002/patient002_4d.nii.gz", None)]

    # frames=(1,) uses the second time frame
    run(CardiacPreparer(frames=(1,)), tmp_path / "database", tmp_path / "out1")
    _assert_close_uint8(
        png(tmp_path / "out1" / "patient001_4d_1_2.png"), _study_acdc_slice(data[:, :, 2, 1].T), "frame 1"
    )


def test_cardiac_small_slices_get_the_scripts_default_value(tmp_path):
    """Slices at most 128 pixels wide: the last output samples (i with i * res / 256 >= res - 0.5) fall
    outside the image and take the script's default value img.GetPixelIDValue() = 8 (sitkFloat32) before the
    rescale. Here res = 40 (33 rows padded by 6 to 39, 40 columns): rows and columns 253-255."""
    rng = np.random.default_rng(5)
    (tmp_path / "raw" / "patient007").mkdir(parents=True)
    data = rng.uniform(100, 200, (40, 33, 1, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "raw" / "patient007" / "patient007_4d.nii.gz"))
    run(CardiacPreparer(), tmp_path / "raw", tmp_path / "out")
    got = png(tmp_path / "out" / "patient007_4d_0_0.png")
    _assert_close_uint8(got, _study_acdc_slice(data[:, :, 0, 0].T), "small")
    # 8 is below every tissue value (100-200): the minimum, 0 after the rescale
    assert (got[253:] == 0).all() and (got[:, 253:] == 0).all() and (got[:253, :253] > 0).all()


def _study_acdc_calls(slab_yx: np.ndarray, size: int = 256) -> np.ndarray:
    """prepare_ACDC.py's SimpleITK calls on one slice, written out (pad_image, resize_image, RescaleIntensity)."""
    img = sitk.Cast(sitk.GetImageFromArray(slab_yx), sitk.sitkFloat32)
    h, w = slab_yx.shape
    res = max(h, w)
    l_pad, r_pad = study_pad(res - w)
    t_pad, b_pad = study_pad(res - h)
    pad = sitk.ConstantPadImageFilter()
    pad.SetPadLowerBound([l_pad, b_pad])
    pad.SetPadUpperBound([r_pad, t_pad])
    pad.SetConstant(float(slab_yx.min()))
    img = pad.Execute(img)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([size, size])
    resampler.SetOutputSpacing([n * sp / size for n, sp in zip(img.GetSize(), img.GetSpacing())])
    resampler.SetOutputDirection(img.GetDirection())
    resampler.SetOutputOrigin(img.GetOrigin())
    resampler.SetTransform(sitk.Transform())
    resampler.SetDefaultPixelValue(img.GetPixelIDValue())
    resampler.SetInterpolator(sitk.sitkBSpline)
    return sitk.GetArrayFromImage(sitk.RescaleIntensity(resampler.Execute(img), 0.0, 255.0))


def test_cardiac_constant_slices_versus_the_study(tmp_path):
    """A constant slice: the study wrote black only when both padded sides exceed 128 pixels; a smaller one came
    out white with a black bottom/right border (constant > 8, the resampler's default value). fidmed skips it, or
    writes it black with constant="zero", whatever its size."""
    large, small = np.full((150, 131), 50, np.int16), np.full((40, 33), 50, np.int16)
    np.testing.assert_array_equal(_study_acdc_calls(large), np.zeros((256, 256)))
    study_small = _study_acdc_calls(small)  # padded to 40 x 39: samples from row/column 253 on are outside
    assert (study_small[:253, :253] == 255).all() and (study_small[253:] == 0).all()
    assert (study_small[:, 253:] == 0).all()
    assert (_study_acdc_calls(np.full((40, 33), 5, np.int16))[:253, :253] == 0).all()  # below 8: the reverse
    assert (_study_acdc_calls(np.full((40, 33), 5, np.int16))[253:] == 255).all()
    for name, slab in (("patient001", large), ("patient002", small)):
        (tmp_path / "raw" / name).mkdir(parents=True)
        slices = np.stack([slab.T, slab.T + np.arange(slab.shape[0])], axis=-1)  # [x, y, 2]: constant, not
        data = np.stack([slices, slices], axis=-1)  # [x, y, 2 slices, 2 frames]
        nib.save(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), str(tmp_path / "raw" / name / f"{name}_4d.nii.gz"))
    report = run(CardiacPreparer(), tmp_path / "raw", tmp_path / "skip")
    assert report.manifest["counts"]["skipped_constant"] == 2
    assert sorted(outputs(tmp_path / "skip")) == ["patient001_4d_0_1.png", "patient002_4d_0_1.png"]
    got = outputs(run(CardiacPreparer(constant="zero"), tmp_path / "raw", tmp_path / "zero").out)
    for name in ("patient001_4d_0_0.png", "patient002_4d_0_0.png"):
        np.testing.assert_array_equal(got[name], np.zeros((256, 256), np.uint8))


# == dicom =====================================================================================================


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    series_uid: str,
    instance: int,
    z: float,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = -1024.0,
    window: tuple[float, float] | None = None,
    patient: str = "P1",
    series_number: int = 3,
) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient, "CT"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, instance
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window[0], window[1]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _dicom_series(root: Path, rng, n=5, rows=12, cols=16, uid="1.2.3.4.5", **kw) -> list[np.ndarray]:
    """n slices at z = 10*k written in shuffled file/instance order; returns the stored arrays in z order."""
    arrays = [rng.integers(0, 3000, (rows, cols)).astype(np.uint16) for _ in range(n)]
    order = rng.permutation(n)
    for rank, k in enumerate(order):
        _write_dicom(
            root / f"IM{rank:04d}", arrays[k], series_uid=uid, instance=int(rng.integers(1, 99)), z=10.0 * k, **kw
        )
    return arrays


def _pad_square(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    side = max(h, w)
    t, left = (side - h) // 2, (side - w) // 2
    return np.pad(a, ((t, side - h - t), (left, side - w - left)), constant_values=a.min())


def test_dicom_series_sorting_windows_selection_and_bad_files(tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "dicom"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    arrays = _dicom_series(src / "a", rng, window=(40, 400))
    hu = [a.astype(np.float64) * 1.0 - 1024.0 for a in arrays]
    inv = rng.integers(0, 3000, (8, 8)).astype(np.uint16)
    _write_dicom(
        src / "b" / "x.dcm",
        inv,
        series_uid="9.9",
        instance=1,
        z=0.0,
        photometric="MONOCHROME1",
        intercept=0.0,
        patient="P 2",
    )
    (src / "README.txt").write_text("not dicom")
    good = (src / "a" / "IM0000").read_bytes()
    (src / "a" / "IM0099").write_bytes(good[: len(good) - 100])  # truncated pixel data inside the series

    report = run(DicomPreparer(), src, tmp_path / "out")
    got = outputs(tmp_path / "out")
    names_a = sorted(n for n in got if n.startswith("P1_3_"))
    assert len(names_a) == 5 and [n[-8:] for n in names_a] == [f"{k:04d}.png" for k in range(5)]
    for k, name in enumerate(names_a):  # z order, padded square with the minimum, per-slice min-max
        sq = _pad_square(hu[k])
        np.testing.assert_array_equal(got[name], np.rint((sq - sq.min()) * 255.0 / (sq.max() - sq.min())))
    (name_b,) = [n for n in got if n.startswith("P-2_")]
    i = inv.astype(np.float64)
    np.testing.assert_array_equal(got[name_b], np.rint(255.0 - (i - i.min()) * 255.0 / (i.max() - i.min())))
    assert got[names_a[0]].shape == (16, 16)
    assert any("IM0099" in s["reason"] for s in report.skipped)
    with pytest.raises(DataError, match="IM0099"):
        run(DicomPreparer(), src, tmp_path / "strict", strict=True)
    (src / "a" / "IM0099").unlink()

    # fixed window 40,400 with DICOM's linear VOI function; middle slice only; no padding
    run(DicomPreparer(window="40,400", slices="middle", square="none"), src / "a", tmp_path / "win")
    (only,) = outputs(tmp_path / "win").values()
    c, w, x = 40.0, 400.0, hu[2]
    ref = np.where(
        x <= c - 0.5 - (w - 1) / 2,
        0.0,
        np.where(x > c - 0.5 + (w - 1) / 2, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0),
    )
    np.testing.assert_array_equal(only, np.rint(ref))
    # the files' own window gives the same; volume min-max over the series; a slice range
    run(DicomPreparer(window="dicom", slices="middle", square="none"), src / "a", tmp_path / "dwin")
    np.testing.assert_array_equal(next(iter(outputs(tmp_path / "dwin").values())), only)
    run(DicomPreparer(window="volume", slices="1:4", square="none"), src / "a", tmp_path / "vol")
    got = outputs(tmp_path / "vol")
    assert [n[-8:] for n in sorted(got)] == ["0001.png", "0002.png", "0003.png"]
    low, high = min(h.min() for h in hu), max(h.max() for h in hu)
    for k, name in zip((1, 2, 3), sorted(got)):
        np.testing.assert_array_equal(got[name], np.rint((hu[k] - low) * 255.0 / (high - low)))
    with pytest.raises(ConfigError):
        DicomPreparer(window="wide")
    with pytest.raises(ConfigError):
        DicomPreparer(slices="1:4:0")


def test_dicom_real_pydicom_samples(tmp_path):
    from pydicom.data import get_testdata_file

    src = tmp_path / "samples"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    report = run(DicomPreparer(), src, tmp_path / "out")
    got = outputs(tmp_path / "out")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0)
        )
        (out_name,) = [
            n for n in got if n.startswith(f"{ds.PatientID}_".replace(" ", "-")) and hashes_to(ds.SeriesInstanceUID, n)
        ]
        expected = np.rint((values - values.min()) * 255.0 / (values.max() - values.min()))
        np.testing.assert_array_equal(
            got[out_name], _pad_square(expected) if values.shape[0] != values.shape[1] else expected
        )
    assert len(got) == 2
    assert any("MR_truncated.dcm" in s["reason"] for s in report.skipped)


def hashes_to(uid: str, name: str) -> bool:
    import hashlib

    return hashlib.sha1(str(uid).encode()).hexdigest()[:8] in name


# == real nibabel sample NIfTIs ================================================================================


def test_nibabel_sample_niftis(tmp_path):
    data_dir = Path(nib.__file__).parent / "tests" / "data"
    example4d = data_dir / "example4d.nii.gz"  # 128 x 96 x 24 x 2, int16
    (tmp_path / "acdc" / "patient001").mkdir(parents=True)
    shutil.copy(example4d, tmp_path / "acdc" / "patient001" / "patient001_4d.nii.gz")
    report = run(CardiacPreparer(), tmp_path / "acdc", tmp_path / "cardiac")
    data = np.asanyarray(nib.load(str(example4d)).dataobj)  # raw stored values, as SimpleITK reads them
    assert data.shape == (128, 96, 24, 2)
    constant = [j for j in range(24) if data[:, :, j, 0].min() == data[:, :, j, 0].max()]
    assert report.num_images == 24 - len(constant)
    j = 12
    _assert_close_uint8(
        png(tmp_path / "cardiac" / f"patient001_4d_0_{j}.png"), _study_acdc_slice(data[:, :, j, 0].T), "example4d"
    )

    (tmp_path / "msd").mkdir()
    shutil.copy(example4d, tmp_path / "msd" / "example4d.nii.gz")
    shutil.copy(data_dir / "anatomical.nii", tmp_path / "msd" / "anatomical.nii")  # 3-D: refused, named
    report = run(MRIPreparer(sequences=(0, 1), pad_to=128, min_nonzero=0.3), tmp_path / "msd", tmp_path / "mri")
    expected = {}
    for s in (0, 1):
        vol = _itk_rescale(np.ascontiguousarray(data[..., s].transpose(2, 1, 0)))
        for i, slab in enumerate(vol):
            padded = np.pad(slab, (msd_pad(128 - 96), (0, 0)))
            if (padded > 0).sum() / (padded > -1).sum() > 0.3:
                expected[f"example4d_{s}_{i}.png"] = padded.astype(np.uint8)
    got = outputs(tmp_path / "mri")
    assert sorted(got) == sorted(expected) and expected
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert [s["source"] for s in report.skipped] == ["anatomical.nii"]
    assert "3-D" in report.skipped[0]["reason"]


# == the runner: manifest, idempotency, resume, parameters =====================================================


def _ct_src(tmp_path: Path, n_volumes: int = 4) -> Path:
    rng = np.random.default_rng(7)
    src = tmp_path / "ctsrc"
    src.mkdir(exist_ok=True)
    for v in range(n_volumes):
        _write_mhd(src / f"liver-orig{v:03d}.mhd", rng.integers(-1000, 2000, (3, 10, 10)).astype(np.int16))
    return src


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}


def test_rerun_is_idempotent_and_loads(tmp_path):
    src = _ct_src(tmp_path)
    out = tmp_path / "out"
    first = run(CTPreparer(), src, out)
    manifest_bytes, mtimes = (out / "manifest.json").read_bytes(), _mtimes(out)
    dataset_hash = ImageFolderDataset(out).manifest_hash()
    second = run(CTPreparer(), src, out)
    assert (first.converted, second.converted, second.reused) == (4, 0, 4)
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert _mtimes(out) == mtimes  # nothing rewritten
    assert ImageFolderDataset(out).manifest_hash() == dataset_hash
    # the manifest: parameters, steps, counts, sizes, and a content hash of the pixels
    m = json.loads(manifest_bytes)
    assert m["preparer"] == "ct" and m["params"]["quantize"] == "round" and m["steps"]
    assert m["counts"]["images"] == 12 and m["image_sizes"] == [{"height": 10, "width": 10, "count": 12}]
    import hashlib

    lines = "".join(
        f"{p.name}\t{hashlib.sha256(b'10x10:' + png(p).tobytes()).hexdigest()}\n" for p in sorted(out.glob("*.png"))
    )
    assert m["content_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert all(str(tmp_path) not in json.dumps(m) for _ in [0])  # no absolute paths: the hash is portable
    # a changed source file is redone, the others are not
    rng = np.random.default_rng(8)
    _write_mhd(src / "liver-orig002.mhd", rng.integers(-1000, 2000, (3, 10, 10)).astype(np.int16))
    third = run(CTPreparer(), src, out)
    assert third.converted == 1 and json.loads((out / "manifest.json").read_bytes()) != m
    # a processes pool gives the same result as in-process conversion
    pooled = run(CTPreparer(), src, tmp_path / "pooled", workers=2)
    assert pooled.manifest["content_sha256"] == third.manifest["content_sha256"]


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    src = _ct_src(tmp_path, 5)
    out = tmp_path / "out"
    real = prepare_runner.convert_source
    calls = []

    def interrupted(preparer, s, o, source):
        if len(calls) == 3:
            # Ctrl-C half-way through a source: one of its images written, the next one still a temporary file
            prepare_output.Emitter(o).image(f"{Path(source.key).stem}_0.png", np.zeros((10, 10), np.uint8))
            (o / f"{prepare_output.TMP_PREFIX}123-{Path(source.key).stem}_1.png").write_bytes(b"partial")
            raise KeyboardInterrupt
        calls.append(source.key)
        return real(preparer, s, o, source)

    monkeypatch.setattr(prepare_runner, "convert_source", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(CTPreparer(), src, out)
    assert not (out / "manifest.json").exists()
    # the unfinished source's image and temporary file are removed: the 3 finished sources' 3 x 3 slices remain
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        f"liver-orig{v:03d}_{i}.png" for v in range(3) for i in range(3)
    ]
    with pytest.raises(DataError, match="unfinished"):
        ImageFolderDataset(out)  # no manifest yet: the loader refuses the half-prepared folder
    # a killed run cleans nothing up: it leaves an image of its unfinished source and a temporary file behind
    prepare_output.Emitter(out).image("liver-orig003_0.png", np.full((10, 10), 7, np.uint8))
    (out / f"{prepare_output.TMP_PREFIX}123-liver-orig003_1.png").write_bytes(b"partial")
    monkeypatch.setattr(prepare_runner, "convert_source", real)
    resumed = run(CTPreparer(), src, out)
    assert (resumed.converted, resumed.reused) == (2, 3)
    assert not list(out.glob(f"{prepare_output.TMP_PREFIX}*"))
    fresh = run(CTPreparer(), src, tmp_path / "fresh")
    assert resumed.manifest == fresh.manifest
    assert (out / "manifest.json").read_bytes() == (tmp_path / "fresh" / "manifest.json").read_bytes()
    assert len(ImageFolderDataset(out)) == 15


def test_every_parameter_changes_the_manifest_hash(tmp_path):
    src = _ct_src(tmp_path, 1)
    variants = [
        CTPreparer(),
        CTPreparer(constant="zero"),
        CTPreparer(quantize="floor"),
        CTPreparer(resolution=8),
        CTPreparer(pattern="liver*.mhd"),
    ]
    hashes = set()
    for k, preparer in enumerate(variants):
        run(preparer, src, tmp_path / f"out{k}")
        hashes.add(ImageFolderDataset(tmp_path / f"out{k}").manifest_hash())
    assert len(hashes) == len(variants)
    # every field of every preparer is a recorded parameter
    for preparer, changes in [
        (XrayPreparer(), dict(high_depth="rescale", resolution=64, quantize="floor")),
        (
            MRIPreparer(),
            dict(rescale="slice", sequences=(0,), pad_to=240, min_nonzero=0.2, nan="skip", quantize="floor"),
        ),
        (CardiacPreparer(), dict(frames=(1,), size=128, constant="zero", nan="skip", quantize="floor")),
        (
            DicomPreparer(),
            dict(window="dicom", slices="middle", square="none", resolution=64, constant="zero", quantize="floor"),
        ),
    ]:
        import dataclasses

        assert set(changes) == {f.name for f in dataclasses.fields(preparer)}
        for key, value in changes.items():
            assert dataclasses.replace(preparer, **{key: value}).params() != preparer.params(), key


def test_other_parameters_foreign_files_and_empty_folders(tmp_path):
    src = _ct_src(tmp_path, 2)
    out = tmp_path / "out"
    run(CTPreparer(), src, out)
    with pytest.raises(DataError, match="quantize: 'round' -> 'floor'.*--overwrite"):
        run(CTPreparer(quantize="floor"), src, out)
    (out / "notes.txt").write_text("kept")
    report = run(CTPreparer(quantize="floor", resolution=8), src, out, overwrite=True)
    assert report.num_images == 6 and (out / "notes.txt").exists()
    assert {png(p).shape for p in out.glob("*.png")} == {(8, 8)}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(foreign / "mine.png")
    with pytest.raises(DataError, match="mine.png"):
        run(CTPreparer(), src, foreign)
    dup = tmp_path / "dup"
    for sub in ("a", "b"):  # the output folder is flat: same-named volumes would overwrite each other's slices
        (dup / sub).mkdir(parents=True)
        _write_mhd(dup / sub / "liver-orig001.mhd", np.zeros((2, 4, 4), np.int16))
    with pytest.raises(DataError, match="same name"):
        run(CTPreparer(), dup, tmp_path / "dup_out")
    (tmp_path / "empty").mkdir()
    for preparer in (XrayPreparer(), CTPreparer(), MRIPreparer(), CardiacPreparer(), DicomPreparer()):
        with pytest.raises(DataError, match="empty"):
            run(preparer, tmp_path / "empty", tmp_path / "o")
    with pytest.raises(DataError, match="does not exist"):
        run(CTPreparer(), tmp_path / "missing", tmp_path / "o")


# == CLI and modality configs ==================================================================================


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fidmed")
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_prepare(tmp_path, capsys):
    src = _ct_src(tmp_path, 1)
    args = _parser().parse_args(
        [
            "prepare",
            "ct",
            "--src",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--no-progress",
            "--quantize",
            "floor",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "3 images" in printed
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["params"]["quantize"] == "floor"
    for argv in (
        ["prepare", "mri", "--src", "a", "--out", "b", "--sequences", "0,x"],
        ["prepare", "mri", "--src", "a", "--out", "b", "--min-nonzero", "2"],
        ["prepare", "xray", "--src", "a"],
    ):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
    args = _parser().parse_args(
        ["prepare", "dicom", "--src", str(src), "--out", str(tmp_path / "d"), "--window", "wide"]
    )
    with pytest.raises(ConfigError, match="wide"):
        args.func(args)
    args = _parser().parse_args(
        ["prepare", "mri", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "m"), "--sequences", "0,2"]
    )
    assert args.sequences == (0, 2)
    with pytest.raises(DataError, match="nothing"):
        args.func(args)


@pytest.mark.parametrize(
    "name,resolution,snapshot", [("xray", 1024, 25000), ("ct", 512, 25000), ("mri", 256, 5000), ("cardiac", 256, 25000)]
)
def test_modality_configs(compose_cfg, tmp_path, name, resolution, snapshot):
    from fidmed.data.datamodule import build_dataset

    cfg = compose_cfg([f"modality={name}"])
    m = cfg.modality
    assert (m.name, m.kind, m.resolution, m.channels, m.study_kimg, m.xflip) == (
        name,
        "folder",
        resolution,
        1,
        snapshot,
        False,
    )
    assert Path(m.path) == tmp_path / "data" / name
    overrides = {"ada": {"pipeline": "bgcfn"}, "diffaugment": {"policy": "color,translation"}} if name == "mri" else {}
    assert dict(m.augmentation_overrides) == overrides
    with pytest.raises(DataError, match=f"fidmed prepare {name} --src RAW --out {tmp_path / 'data' / name}"):
        build_dataset(m)


def test_prepared_folder_feeds_the_modality(compose_cfg, tmp_path):
    from fidmed.data.datamodule import build_dataset

    src = _ct_src(tmp_path, 2)
    run(CTPreparer(), src, tmp_path / "data" / "ct")
    dataset = build_dataset(compose_cfg(["modality=ct", "modality.resolution=10"]).modality)
    assert len(dataset) == 6 and dataset.image_shape == (1, 10, 10)
    names = sorted(p.name for p in (tmp_path / "data" / "ct").glob("*.png"))
    np.testing.assert_array_equal(dataset[4][0].numpy(), png(tmp_path / "data" / "ct" / names[4]))
    assert dataset.manifest()["prepare_manifest_sha256"] is not None
