"""Making a blinded VTT (pages + sealed key) and reading answers back, with every bad-input case."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fidmed.analysis.scoring import GENERATED, REAL
from fidmed.analysis.vtt import PAGE_COLUMNS, LikertScale, answers_from_pages, key_sha256, load_key, make_vtt
from fidmed.errors import ConfigError, DataError


def folder(path: Path, n: int, seed: int, size: int = 16) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


def page_data(page: Path) -> dict:
    text = page.read_text()
    match = re.search(r"const DATA = (\{.*?\});\n", text)
    return json.loads(match.group(1).replace("<\\/", "</"))


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.array(PIL.Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


@pytest.fixture
def vtt(tmp_path):
    real = folder(tmp_path / "real", 12, 0)
    models = {"noaug": folder(tmp_path / "gen_noaug", 6, 1), "ada": folder(tmp_path / "gen_ada", 6, 2)}
    bundle = make_vtt(
        real,
        models,
        tmp_path / "pages",
        raters=3,
        n_real=4,
        n_generated=3,
        seed=7,
        likert=LikertScale(1, 5),
        modality="ct",
    )
    return bundle, real, models


def write_answers(path: Path, key: dict, rater: str, answer=lambda pos, image_id: ("real", 3), rows=None) -> Path:
    seal = key_sha256(key)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PAGE_COLUMNS)
        for pos, image_id in enumerate(key["raters"][rater]["order"], start=1):
            a, r = answer(pos, image_id)
            w.writerow([key["test_id"], seal, rater, pos, image_id, a, r, ""])
        for row in rows or []:
            w.writerow(row)
    return path


def test_make_vtt_layout_blinding_and_pixels(vtt, tmp_path):
    bundle, real, models = vtt
    key = load_key(bundle.key_path)
    assert bundle.key_path == tmp_path / "pages.key.json"  # beside the raters' folder, not in it
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["rater1.html", "rater2.html", "rater3.html"]
    # per model: 4 real + 3 generated, real images all different across models
    real_sources = []
    for rec in key["models"].values():
        truths = [key["images"][i]["truth"] for i in rec["images"]]
        assert truths.count(REAL) == 4 and truths.count(GENERATED) == 3
        real_sources += [key["images"][i]["source"] for i in rec["images"] if key["images"][i]["truth"] == REAL]
    assert len(set(real_sources)) == 8
    orders = []
    for rater, rec in key["raters"].items():
        data = page_data(bundle.pages[rater])
        # the same images per model for every rater; one part per model, images of a part together
        assert sorted(rec["order"]) == sorted(i for m in key["models"].values() for i in m["images"])
        assert [it["id"] for it in data["items"]] == rec["order"]
        first_part = rec["order"][:7]
        assert set(first_part) == set(key["models"][rec["parts"][0]]["images"])
        assert {it["part"] for it in data["items"][:7]} == {1}
        orders.append(tuple(rec["order"]))
        # nothing on the page tells real from generated: no truths, model names or sources
        assert set(data) == {"test_id", "key_sha256", "rater", "title", "likert", "n_parts", "items"}
        assert all(set(it) == {"id", "part", "src"} for it in data["items"])
        text = bundle.pages[rater].read_text()
        for word in ("noaug", "gen_ada", "gen_noaug", "truth", str(real)):
            assert word not in text
        payload = json.dumps(data)
        for word in ('"real"', '"generated"', '"ada"', '"noaug"'):
            assert word not in payload
        assert data["key_sha256"] == key_sha256(key) and data["test_id"] == key["test_id"]
        # offline: nothing but inline script/style and data: images; a CSP forbids any request
        assert "default-src 'none'" in text
        assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:)", text)
        assert "http://" not in text and "https://" not in text
        # pixels are the source images' pixels
        for it in data["items"]:
            info = key["images"][it["id"]]
            base = real if info["truth"] == REAL else models[info["model"]]
            expected = np.array(PIL.Image.open(base / info["source"]))
            np.testing.assert_array_equal(decode(it["src"]), expected)
    assert len(set(orders)) == 3  # each rater has an order of their own


def test_same_seed_same_test_but_a_fresh_seal(tmp_path, vtt):
    bundle, real, models = vtt
    again = make_vtt(real, models, tmp_path / "again", raters=3, n_real=4, n_generated=3, seed=7, modality="ct")
    a, b = load_key(bundle.key_path), load_key(again.key_path)
    assert a["images"] == b["images"] and a["raters"] == b["raters"]
    assert a["salt"] != b["salt"] and key_sha256(a) != key_sha256(b)


def test_generator_images_are_the_study_quantised_seeds(tmp_path):
    from fidmed.evaluation.sources import latents_for_seeds, quantize_to_uint8
    from fidmed.gan.checkpoint import SNAPSHOT_FORMAT, atomic_torch_save, load_generator
    from fidmed.gan.networks import build_networks

    kwargs = dict(
        resolution=16, channels=1, z_dim=8, w_dim=8, mapping_layers=1, channel_base=64, channel_max=16, num_fp16_res=0
    )
    torch.manual_seed(0)
    G, _ = build_networks(**kwargs)
    gen_path = atomic_torch_save(
        {"format": SNAPSHOT_FORMAT, "G_ema": G.state_dict(), "network_kwargs": kwargs, "kimg": 1.0},
        tmp_path / "network-snapshot-000001.pt",
    )
    real = folder(tmp_path / "real", 5, 0)
    bundle = make_vtt(
        real, {"noaug": gen_path}, tmp_path / "pages", raters=["x"], n_real=2, n_generated=3, seed=1, seed_pool=100
    )
    key = bundle.key
    assert key["models"]["noaug"]["source"]["kind"] == "generator"
    G2, _ = load_generator(gen_path)
    data = page_data(bundle.pages["x"])
    seen = 0
    for it in data["items"]:
        info = key["images"][it["id"]]
        if info["truth"] != GENERATED:
            continue
        seed = info["source"]
        assert 0 <= seed < 100
        with torch.no_grad():
            img = G2(latents_for_seeds([seed], 8), torch.zeros([1, 0]), truncation_psi=1.0, noise_mode="const")
        np.testing.assert_array_equal(decode(it["src"]), quantize_to_uint8(img)[0, 0].numpy())
        seen += 1
    assert seen == 3
    with pytest.raises(DataError, match=r"makes \(1, 16, 16\).*real images are \(1, 8, 8\)"):
        make_vtt(
            folder(tmp_path / "small", 5, 0, size=8),
            {"noaug": gen_path},
            tmp_path / "p2",
            raters=1,
            n_real=2,
            n_generated=2,
        )


def test_answers_round_trip_and_bad_inputs(vtt, tmp_path):
    bundle, _, _ = vtt
    key = load_key(bundle.key_path)
    files = [
        write_answers(tmp_path / f"{r}.csv", key, r, lambda pos, i: ("real" if pos % 2 else "generated", 1 + pos % 5))
        for r in key["raters"]
    ]
    answers = answers_from_pages(files, key)
    assert len(answers) == 3 * 14
    by = {(a.rater, a.image_id): a for a in answers}
    for r, rec in key["raters"].items():
        for pos, i in enumerate(rec["order"], start=1):
            a = by[(r, i)]
            assert (a.answer, a.rating) == ("real" if pos % 2 else "generated", 1 + pos % 5)
            assert (a.model, a.truth, a.modality) == (key["images"][i]["model"], key["images"][i]["truth"], "ct")

    # duplicate (the same file twice)
    with pytest.raises(DataError, match=r"duplicate answer: rater rater1, image"):
        answers_from_pages(files + files[:1], key)
    # a rater missing: error unless allowed
    with pytest.raises(DataError, match=r"no answers from rater\(s\) rater3 of the key"):
        answers_from_pages(files[:2], key)
    assert len(answers_from_pages(files[:2], key, allow_missing_raters=True)) == 28
    # missing rows
    order = key["raters"]["rater1"]["order"]
    short = tmp_path / "short.csv"
    lines = files[0].read_text().splitlines()
    short.write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(
        DataError, match=rf"rater rater1: 2 of 14 images have no answer row \({order[-2]}, {order[-1]}\)"
    ):
        answers_from_pages([short, *files[1:]], key)
    # blank answer / rating
    blank = write_answers(
        tmp_path / "blank.csv",
        key,
        "rater1",
        lambda pos, i: ("", 3) if pos == 4 else ("real", "") if pos == 5 else ("real", 3),
    )
    with pytest.raises(
        DataError,
        match=rf"rater rater1 image {order[3]} \(position 4: no answer\).*"
        rf"image {order[4]} \(position 5: no rating\)",
    ):
        answers_from_pages([blank, *files[1:]], key)
    # unknown image
    seal = key_sha256(key)
    extra = write_answers(
        tmp_path / "extra.csv", key, "rater1", rows=[[key["test_id"], seal, "rater1", 15, "deadbeef", "real", 3, ""]]
    )
    with pytest.raises(DataError, match=r"images that are not in the key: deadbeef"):
        answers_from_pages([extra, *files[1:]], key)
    # unknown rater
    stranger = write_answers(
        tmp_path / "s.csv", key, "rater1", rows=[[key["test_id"], seal, "mallory", 1, order[0], "real", 3, ""]]
    )
    with pytest.raises(DataError, match=r"rater 'mallory' is not in the key"):
        answers_from_pages([stranger], key)
    # rating off the scale, bad answer word
    off = write_answers(tmp_path / "off.csv", key, "rater1", lambda pos, i: ("real", 7 if pos == 2 else 3))
    with pytest.raises(DataError, match=r"line 3: rating 7 is off the test's scale 1..5"):
        answers_from_pages([off], key)
    word = write_answers(tmp_path / "w.csv", key, "rater1", lambda pos, i: ("fake?" if pos == 1 else "real", 3))
    with pytest.raises(DataError, match=r"line 2: answer 'fake\?'"):
        answers_from_pages([word], key)
    # another test / an altered key
    other = dict(key, test_id="vtt-other")
    with pytest.raises(DataError, match=r"answer to test 'vtt-\w+', but the key is for test 'vtt-other'"):
        answers_from_pages(files, other)
    altered = json.loads(json.dumps(key))
    first = next(iter(altered["images"]))
    altered["images"][first]["truth"] = GENERATED if altered["images"][first]["truth"] == REAL else REAL
    with pytest.raises(DataError, match=r"the key has changed since the pages were made"):
        answers_from_pages(files, altered)
    # missing columns
    bad = tmp_path / "cols.csv"
    bad.write_text("rater,image_id,answer\nrater1,x,real\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) test_id, key_sha256, position, rating, answered_at"):
        answers_from_pages([bad], key)


def test_bad_test_settings(tmp_path):
    real = folder(tmp_path / "real", 5, 0)
    gen = folder(tmp_path / "gen", 5, 1)
    with pytest.raises(DataError, match=r"holds 5 real images; 2 models x 3 different real images need 6"):
        make_vtt(real, {"a": gen, "b": gen}, tmp_path / "p", raters=1, n_real=3, n_generated=2)
    make_vtt(real, {"a": gen, "b": gen}, tmp_path / "p", raters=1, n_real=3, n_generated=2, reuse_real=True)
    with pytest.raises(DataError, match=r"model a: .* holds 5 images, the test needs 6"):
        make_vtt(real, {"a": gen}, tmp_path / "p", raters=1, n_real=3, n_generated=6)
    with pytest.raises(ConfigError, match=r"must not be inside the raters' folder"):
        make_vtt(
            real, {"a": gen}, tmp_path / "p", key_path=tmp_path / "p" / "key.json", raters=1, n_real=1, n_generated=1
        )
    with pytest.raises(ConfigError, match=r"rater name\(s\) given twice: x"):
        make_vtt(real, {"a": gen}, tmp_path / "p", raters=["x", "x"])
    with pytest.raises(ConfigError, match=r"0 <= low < high <= 9"):
        LikertScale(1, 10)
    with pytest.raises(ConfigError, match=r"has 3 points but 2 labels"):
        LikertScale(1, 3, ("no", "yes"))
    with pytest.raises(DataError, match=r"neither a generator file"):
        make_vtt(real, {"a": tmp_path / "nothing"}, tmp_path / "p", raters=1, n_real=1, n_generated=1)


def test_cli_make_and_score(tmp_path):
    import argparse

    from fidmed.analysis.cli import add_analysis_parsers

    parser = argparse.ArgumentParser(prog="fidmed")
    add_analysis_parsers(parser.add_subparsers(dest="command", required=True))
    real = folder(tmp_path / "real", 6, 0)
    gen = folder(tmp_path / "gen", 3, 1)
    args = parser.parse_args(
        [
            "vtt",
            "make",
            "--real",
            str(real),
            "--model",
            f"noaug={gen}",
            "--out",
            str(tmp_path / "pages"),
            "--rater",
            "a",
            "--rater",
            "b",
            "--n-real",
            "3",
            "--n-generated",
            "3",
            "--likert",
            "0",
            "3",
            "--modality",
            "mri",
        ]
    )
    assert args.func(args) == 0
    key = load_key(tmp_path / "pages.key.json")
    assert key["likert"] == {"low": 0, "high": 3, "labels": []}
    files = [
        write_answers(
            tmp_path / f"{r}.csv",
            key,
            r,
            lambda pos, i: (
                "real" if key["images"][i]["truth"] == REAL else "generated",
                3 if key["images"][i]["truth"] == REAL else 0,
            ),
        )
        for r in ("a", "b")
    ]
    args = parser.parse_args(
        ["vtt", "score", *map(str, files), str(tmp_path / "pages.key.json"), "--out", str(tmp_path / "scores")]
    )
    assert args.func(args) == 0
    with open(tmp_path / "scores" / "vtt_scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rater"], r["model"], r["modality"]) for r in rows] == [("a", "noaug", "mri"), ("b", "noaug", "mri")]
    # perfect raters: accuracy 1, FPR 0, Diff 3, KS D = 1 with p = 2/C(6,3)
    for r in rows:
        assert (float(r["accuracy"]), float(r["fpr"]), float(r["diff"]), float(r["ks_statistic"])) == (1, 0, 3, 1)
        assert float(r["ks_pvalue"]) == pytest.approx(2 / 20, rel=1e-12)
    with open(tmp_path / "scores" / "vtt_answers.csv") as f:
        assert len(list(csv.DictReader(f))) == 12


def test_cli_score_marks_tied_ranks_and_undefined_t_tests(tmp_path, capsys):
    # The example: 10 generated images per model, called real by five raters 5,7,8,8,0 times (m1) and
    # 2,4,10,8,4 times (m2): both 28 of 50, mean FPR 0.56 (float summation: 0.5599999999999999 and 0.56, ranks 3
    # and 2). Rater a calls every image of m3 real, rater c every image of m2: undefined t tests, not rejections.
    import argparse

    from fidmed.analysis.cli import add_analysis_parsers
    from fidmed.analysis.scoring import Answer
    from fidmed.analysis.tabular import write_csv_rows

    fp = {"m1": (5, 7, 8, 8, 0), "m2": (2, 4, 10, 8, 4), "m3": (10, 9, 9, 9, 9), "m4": (1, 1, 1, 1, 1)}
    rows = []
    for model, counts in fp.items():
        for rater, k in zip("abcde", counts):
            for i in range(10):
                rows.append(Answer("ct", rater, model, f"{model}-r{i}", REAL, REAL, 4.0).to_dict())
                said = REAL if i < k else GENERATED
                rows.append(
                    Answer("ct", rater, model, f"{model}-g{i}", GENERATED, said, 3.0 if said == REAL else 2.0).to_dict()
                )
    answers = write_csv_rows(tmp_path / "answers.csv", rows)
    parser = argparse.ArgumentParser(prog="fidmed")
    add_analysis_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["vtt", "score", str(answers), "--out", str(tmp_path / "scores"), "--criteria", "fpr", "diff"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "scores" / "vtt_models.csv") as f:
        models = {r["model"]: r for r in csv.DictReader(f)}
    assert [float(models[m]["rank_fpr"]) for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    assert models["m1"]["mean_fpr"] == models["m2"]["mean_fpr"] == "0.56"
    assert [float(models[m]["rank_diff"]) for m in ("m1", "m2", "m3", "m4")] == [2.5, 2.5, 1.0, 4.0]
    assert (models["m3"]["t_not_rejected"], models["m3"]["t_undefined"]) == ("5", "1")
    assert (models["m2"]["t_not_rejected"], models["m2"]["t_undefined"]) == ("2", "1")
    # printed: the tied ranks carry '=' (m1 and m2, by FPR and by Diff); the undefined t test says what it counts as
    per_model = printed.split("VTT per model")[1]
    lines = {m: next(line for line in per_model.splitlines() if f" {m} " in line) for m in fp}
    for m in ("m1", "m2"):
        assert lines[m].count("2.5=") == 2, lines[m]
    assert "=" not in lines["m3"] and "=" not in lines["m4"]
    assert "5 (1 undefined)" in lines["m3"] and "2 (1 undefined)" in lines["m2"]
    per_rater = printed.split("VTT per model")[0]
    assert per_rater.count("undefined (not rejected)") == 2
