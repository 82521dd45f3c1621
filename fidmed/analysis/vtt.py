"""Making a blinded visual Turing test (VTT) and reading its answers back (docs/vtt.md).

``make_vtt`` draws, per model, ``n_real`` real images (from a prepared image folder) and ``n_generated`` generated
images (from a generator file, with seeds drawn at random from ``0 .. seed_pool-1`` and quantised exactly as the
study's ``generate.py`` saves them, or from a folder of generated images). Every rater sees the same images of a
model, in a random order of their own, one model after the other ("part 1", "part 2", ... in a random order per
rater; model names never appear on the page). Each rater gets one self-contained HTML page; the answer key goes to a
separate JSON file that raters must not see.

Sealing: the key holds a random salt, and every page (and so every exported answers CSV) carries the sha256 of the
key's canonical JSON. ``fidmed vtt score`` refuses answers whose test id or key hash differ from the key's, so a
key edited after the pages were made, or answers from another test, cannot be scored by mistake. Image ids are
random tokens and all images are re-encoded as plain PNGs the same way, so nothing on a page tells real from
generated except the pixels.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fidmed.analysis.scoring import GENERATED, REAL, TRUTHS, Answer
from fidmed.analysis.tabular import canonical_sha256, format_list, read_csv_rows
from fidmed.errors import ConfigError, DataError

KEY_FORMAT = "fidmed-vtt-key-1"
PAGE_COLUMNS = ("test_id", "key_sha256", "rater", "position", "image_id", "answer", "rating", "answered_at")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class LikertScale:
    """Integer realism scale ``low..high`` (keys are the digits themselves, so 0 <= low < high <= 9).

    ``labels``: optional words for each point, from ``low`` (surely generated) to ``high`` (surely real). The
    study's scale is not published; 1-5 is fidmed's default.
    """

    low: int = 1
    high: int = 5
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.low, int) and isinstance(self.high, int) and 0 <= self.low < self.high <= 9):
            raise ConfigError(
                f"Likert scale {self.low}..{self.high}: use integers with 0 <= low < high <= 9 "
                f"(each point is answered with its digit key)."
            )
        if self.labels and len(self.labels) != self.high - self.low + 1:
            raise ConfigError(
                f"the Likert scale {self.low}..{self.high} has {self.high - self.low + 1} points but "
                f"{len(self.labels)} labels were given."
            )

    @property
    def points(self) -> list[int]:
        return list(range(self.low, self.high + 1))


@dataclass
class VTTBundle:
    """What ``make_vtt`` wrote."""

    key_path: Path
    pages: dict[str, Path]
    key: dict[str, Any] = field(repr=False)

    @property
    def key_sha256(self) -> str:
        return key_sha256(self.key)


def key_sha256(key: Mapping[str, Any]) -> str:
    """The seal: sha256 of the key's canonical JSON."""
    return canonical_sha256(key)


def rater_names(raters: int | Sequence[str]) -> list[str]:
    names = [f"rater{i + 1}" for i in range(raters)] if isinstance(raters, int) else [str(r) for r in raters]
    if not names:
        raise ConfigError("a visual Turing test needs at least one rater.")
    bad = [n for n in names if not _NAME_RE.match(n)]
    if bad:
        raise ConfigError(
            f"rater name(s) {', '.join(map(repr, bad))}: use letters, digits, '_', '-', '.' (they become file names)."
        )
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"rater name(s) given twice: {', '.join(dups)}.")
    return names


def png_data_uri(image: np.ndarray) -> str:
    """uint8 ``[C, H, W]`` (C = 1 or 3) -> ``data:image/png;base64,...`` with no metadata."""
    import PIL.Image

    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _generated_images(
    name: str,
    path: Path,
    n: int,
    rng: np.random.Generator,
    seed_pool: int,
    shape: tuple[int, ...],
    device: str,
    batch_size: int,
    allow_modified_source: bool = False,
) -> tuple[np.ndarray, list[Any], dict]:
    """``n`` generated images of one model: (uint8 [n, C, H, W], per-image source, model source record)."""
    if path.is_dir():
        from fidmed.data.folder import ImageFolderDataset

        ds = ImageFolderDataset(path, channels=shape[0], cache="none")
        if len(ds) < n:
            raise DataError(f"model {name}: {path} holds {len(ds)} images, the test needs {n}.")
        if ds.image_shape != shape:
            raise DataError(
                f"model {name}: images in {path} are {ds.image_shape} (C, H, W) but the real images are "
                f"{shape}; the test must show images of one size."
            )
        idx = np.sort(rng.choice(len(ds), n, replace=False))
        return (
            ds.get_batch(idx),
            [ds.files[i].relpath for i in idx],
            {"kind": "folder", "path": str(path), "manifest_sha256": ds.manifest_hash()},
        )
    if not path.is_file():
        raise DataError(f"model {name}: {path} is neither a generator file (.pt/.ckpt/.pkl) nor an image folder.")
    import torch

    from fidmed.evaluation.sources import GeneratorSource
    from fidmed.gan.checkpoint import load_generator

    if seed_pool < n:
        raise ConfigError(f"seed_pool={seed_pool} is smaller than the {n} generated images needed.")
    G, record = load_generator(path, device, allow_modified_source=allow_modified_source)
    g_shape = (int(G.img_channels), int(G.img_resolution), int(G.img_resolution))
    if g_shape != shape:
        raise DataError(
            f"model {name}: generator {path} makes {g_shape} (C, H, W) images but the real images are "
            f"{shape}; use the real folder of the generator's modality and resolution."
        )
    seeds = np.sort(rng.choice(seed_pool, n, replace=False))
    source = GeneratorSource(G, num=seed_pool, seed_start=0, device=device)
    images = torch.cat([batch for _, batch in source.batches(batch_size, indices=seeds)]).numpy()
    return (
        images,
        [int(s) for s in seeds],
        {
            "kind": "generator",
            "path": str(path),
            "kimg": record.get("kimg"),
            **source.description,
            "seeds": "drawn per image",
        },
    )


def make_vtt(
    real_dir: str | os.PathLike,
    models: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    key_path: str | os.PathLike | None = None,
    raters: int | Sequence[str] = 5,
    n_real: int = 10,
    n_generated: int = 10,
    seed: int = 0,
    likert: LikertScale = LikertScale(),
    modality: str = "",
    seed_pool: int = 50_000,
    reuse_real: bool = False,
    title: str = "Visual Turing test",
    device: str = "cpu",
    batch_size: int = 8,
    allow_modified_source: bool = False,
) -> VTTBundle:
    """Write one HTML page per rater to ``out_dir`` and the sealed key to ``key_path``.

    Args:
        real_dir: prepared real images (an image folder, as ``fidmed prepare`` writes it).
        models: model name -> generator file (.pt/.ckpt/.pkl) or folder of generated images. Names are what
            ``fidmed analyze`` joins with the FD results (by default the augmentation: noaug, ada, apa, ...).
        key_path: default ``<out_dir>.key.json`` next to ``out_dir``, so that sharing ``out_dir`` shares no key.
        raters: a number (names rater1..N) or the raters' names.
        n_real, n_generated: images per model (the study: 10 + 10).
        seed: draws the images, seeds and orders (the salt of the seal is random).
        reuse_real: allow a real image in more than one model's part (needed when the real set is smaller than
            n_real x models); by default all real images differ.
    """
    from fidmed.data.folder import ImageFolderDataset

    names = rater_names(raters)
    if not models:
        raise ConfigError("a visual Turing test needs at least one model (--model NAME=PATH).")
    bad = [m for m in models if not _NAME_RE.match(str(m))]
    if bad:
        raise ConfigError(f"model name(s) {', '.join(map(repr, bad))}: use letters, digits, '_', '-', '.'.")
    if n_real < 1 or n_generated < 1:
        raise ConfigError(f"each model needs at least one real and one generated image (got {n_real} + {n_generated}).")
    out_dir = Path(out_dir)
    key_path = Path(key_path) if key_path is not None else out_dir.parent / f"{out_dir.name}.key.json"
    if key_path.resolve().is_relative_to(out_dir.resolve()):
        raise ConfigError(f"the key {key_path} must not be inside the raters' folder {out_dir}.")
    rng = np.random.default_rng(seed)
    real = ImageFolderDataset(real_dir, cache="none")
    shape = real.image_shape
    model_names = list(models)
    total_real = n_real * len(model_names)
    if not reuse_real and len(real) < total_real:
        raise DataError(
            f"{real_dir} holds {len(real)} real images; {len(model_names)} models x {n_real} different "
            f"real images need {total_real}. Use fewer images per model or allow reuse (--reuse-real)."
        )
    if len(real) < n_real:
        raise DataError(f"{real_dir} holds {len(real)} real images, fewer than the {n_real} per model.")
    real_draw = rng.choice(len(real), total_real, replace=False) if not reuse_real else None

    images: dict[str, dict[str, Any]] = {}
    data_uris: dict[str, str] = {}
    model_records: dict[str, Any] = {}

    def new_id() -> str:
        while True:
            token = f"{int(rng.integers(0, 2**32)):08x}"
            if token not in images:
                return token

    for k, name in enumerate(model_names):
        idx = (
            real_draw[k * n_real : (k + 1) * n_real]
            if real_draw is not None
            else rng.choice(len(real), n_real, replace=False)
        )
        idx = np.sort(idx)
        real_batch = real.get_batch(idx)
        gen_batch, gen_sources, source = _generated_images(
            name, Path(models[name]), n_generated, rng, seed_pool, shape, device, batch_size, allow_modified_source
        )
        ids = []
        for image, src in zip(real_batch, [real.files[i].relpath for i in idx]):
            image_id = new_id()
            images[image_id] = {"model": name, "truth": REAL, "source": src}
            data_uris[image_id] = png_data_uri(image)
            ids.append(image_id)
        for image, src in zip(gen_batch, gen_sources):
            image_id = new_id()
            images[image_id] = {"model": name, "truth": GENERATED, "source": src}
            data_uris[image_id] = png_data_uri(image)
            ids.append(image_id)
        model_records[name] = {"source": source, "images": sorted(ids)}

    rater_records = {}
    for rater in names:
        parts = [model_names[i] for i in rng.permutation(len(model_names))]
        order = []
        for part in parts:
            ids = model_records[part]["images"]
            order.extend(ids[i] for i in rng.permutation(len(ids)))
        rater_records[rater] = {"parts": parts, "order": order, "page": f"{rater}.html"}

    key = {
        "format": KEY_FORMAT,
        "test_id": f"vtt-{secrets.token_hex(6)}",
        "salt": secrets.token_hex(16),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "title": title,
        "modality": modality,
        "seed": seed,
        "n_real": n_real,
        "n_generated": n_generated,
        "seed_pool": seed_pool,
        "reuse_real": reuse_real,
        "likert": asdict(likert) | {"labels": list(likert.labels)},
        "real": {"path": str(real_dir), "manifest_sha256": real.manifest_hash(), "shape": list(shape)},
        "models": model_records,
        "images": images,
        "raters": rater_records,
    }
    seal = key_sha256(key)

    from fidmed.analysis.vtt_page import render_page

    out_dir.mkdir(parents=True, exist_ok=True)
    pages = {}
    n_parts = len(model_names)
    for rater, record in rater_records.items():
        part_of = {i: p for p, part in enumerate(record["parts"]) for i in model_records[part]["images"]}
        payload = {
            "test_id": key["test_id"],
            "key_sha256": seal,
            "rater": rater,
            "title": title,
            "likert": {"low": likert.low, "high": likert.high, "labels": list(likert.labels)},
            "n_parts": n_parts,
            "items": [{"id": i, "part": part_of[i] + 1, "src": data_uris[i]} for i in record["order"]],
        }
        path = out_dir / record["page"]
        path.write_text(render_page(payload), encoding="utf-8")
        pages[rater] = path
    key_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_path.with_name(f".{key_path.name}.tmp")
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, key_path)
    return VTTBundle(key_path=key_path, pages=pages, key=key)


def load_key(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a key written by :func:`make_vtt`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"VTT key {path} does not exist (`fidmed vtt make` writes it next to the pages' folder).")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"VTT key {path} is not valid JSON ({exc}).") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise DataError(f"{path} is not a fidmed VTT key (format {KEY_FORMAT}).")
    for field_name in ("test_id", "images", "raters", "models", "likert"):
        if field_name not in key:
            raise DataError(
                f"VTT key {path} lacks {field_name!r}; it is damaged: use the file `fidmed vtt make` wrote."
            )
    return key


def answers_from_pages(
    paths: Sequence[str | os.PathLike], key: Mapping[str, Any], allow_missing_raters: bool = False
) -> list[Answer]:
    """Answers CSVs exported by the rater pages + the key -> validated :class:`Answer` rows.

    Every problem is an error that names the file, line, rater and images: answers for another test or an altered
    key, unknown raters, unknown images, images not in that rater's test, duplicates, missing or blank answers,
    ratings off the scale, and (unless ``allow_missing_raters``) raters of the key with no answers at all.
    """
    seal = key_sha256(key)
    scale = LikertScale(int(key["likert"]["low"]), int(key["likert"]["high"]), tuple(key["likert"]["labels"]))
    seen: dict[tuple[str, str], str] = {}
    answers: list[Answer] = []
    unknown: list[str] = []
    foreign: list[str] = []
    blanks: list[str] = []
    for path in paths:
        rows = read_csv_rows(path, PAGE_COLUMNS, what="VTT answers")
        for line, row in enumerate(rows, start=2):
            where = f"{path} line {line}"
            if row["test_id"] != key["test_id"]:
                raise DataError(
                    f"{where} is an answer to test {row['test_id']!r}, but the key is for test "
                    f"{key['test_id']!r}; score it with that test's key."
                )
            if row["key_sha256"] != seal:
                raise DataError(
                    f"{where}: the key has changed since the pages were made (its sha256 is {seal}, the "
                    f"page had {row['key_sha256']}); use the key file exactly as `fidmed vtt make` "
                    f"wrote it."
                )
            rater, image_id = row["rater"], row["image_id"]
            if rater not in key["raters"]:
                raise DataError(f"{where}: rater {rater!r} is not in the key (raters: {', '.join(key['raters'])}).")
            if image_id not in key["images"]:
                unknown.append(f"{image_id} ({where})")
                continue
            if image_id not in key["raters"][rater]["order"]:
                foreign.append(f"{image_id} for rater {rater} ({where})")
                continue
            if (rater, image_id) in seen:
                raise DataError(
                    f"duplicate answer: rater {rater}, image {image_id} at {seen[(rater, image_id)]} and "
                    f"{where}; pass each answers file once and remove repeated rows."
                )
            seen[(rater, image_id)] = where
            answer = row["answer"].strip().lower()
            if answer == "" or row["rating"].strip() == "":
                what = " and ".join(w for w, v in (("answer", answer), ("rating", row["rating"].strip())) if v == "")
                blanks.append(f"rater {rater} image {image_id} (position {row['position']}: no {what})")
                continue
            if answer not in TRUTHS:
                raise DataError(f"{where}: answer {row['answer']!r}; use 'real' or 'generated'.")
            try:
                rating = int(row["rating"])
            except ValueError:
                raise DataError(f"{where}: rating {row['rating']!r} is not an integer.") from None
            if rating not in scale.points:
                raise DataError(f"{where}: rating {rating} is off the test's scale {scale.low}..{scale.high}.")
            info = key["images"][image_id]
            answers.append(
                Answer(key.get("modality", ""), rater, info["model"], image_id, info["truth"], answer, float(rating))
            )
    if unknown:
        raise DataError(
            f"answers for images that are not in the key: {format_list(unknown, 6)}; these answers belong "
            f"to another test."
        )
    if foreign:
        raise DataError(f"answers for images that were not in that rater's test: {format_list(foreign, 6)}.")
    if blanks:
        raise DataError(
            f"unanswered images (the rater must answer real/generated and give a rating): {format_list(blanks, 8)}."
        )
    answered_raters = {r for r, _ in seen}
    missing = []
    for rater in key["raters"]:
        if rater not in answered_raters:
            continue
        left = [i for i in key["raters"][rater]["order"] if (rater, i) not in seen]
        if left:
            missing.append(
                f"rater {rater}: {len(left)} of {len(key['raters'][rater]['order'])} images have no "
                f"answer row ({format_list(left, 5)})"
            )
    if missing:
        raise DataError(f"missing answers: {'; '.join(missing)}. Export the answers again once the rater is done.")
    absent = [r for r in key["raters"] if r not in answered_raters]
    if absent and not allow_missing_raters:
        raise DataError(
            f"no answers from rater(s) {', '.join(absent)} of the key; pass their answer files, or "
            f"--allow-missing-raters to score only the raters present."
        )
    if not answers:
        raise DataError("no answers in the given files.")
    return answers
