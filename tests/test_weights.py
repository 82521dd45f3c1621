"""Weights resolver and extractor registry: where files are found, hash checks, offline failures, random init."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fidmed.errors import ConfigError, FidmedError, WeightsMissingError
from fidmed.features import weights as W
from fidmed.features.registry import (
    available_extractors,
    build_extractor,
    check_weights_available,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "extractor" / "inception_tf.yaml"
PAYLOAD = b"not really weights, but bytes with a known digest\n" * 100


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> None:
    """No test touches ~/.cache or the network: private weights and hub folders, offline flags cleared."""
    monkeypatch.setenv("FIDMED_WEIGHTS", str(tmp_path / "fidmed_weights"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("FIDMED_OFFLINE", raising=False)


def _spec(name: str = "model-1234abcd.pth", urls: tuple[str, ...] = (), payload: bytes = PAYLOAD) -> W.WeightsSpec:
    return W.WeightsSpec(name, hashlib.sha256(payload).hexdigest(), urls, "test weights", "ask the test")


def _put(folder: Path, name: str, payload: bytes = PAYLOAD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    return folder / name


def test_found_in_weights_dir_and_hash_cached(tmp_path: Path) -> None:
    spec = _spec()
    path = _put(tmp_path / "mine", spec.filename)
    assert W.resolve_weights(spec, tmp_path / "mine") == path
    cache = path.with_name(path.name + ".sha256.json")
    assert cache.is_file()
    # the cached digest is trusted while name, size and mtime match ...
    text = cache.read_text().replace(spec.sha256, "0" * 64)
    cache.write_text(text)
    assert W.sha256_of(path) == "0" * 64
    # ... and ignored once the file changes
    path.write_bytes(PAYLOAD + b"x")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert W.sha256_of(path) == hashlib.sha256(PAYLOAD + b"x").hexdigest()


def test_env_var_sets_default_dir(tmp_path: Path) -> None:
    spec = _spec()
    path = _put(tmp_path / "fidmed_weights", spec.filename)
    assert W.default_weights_dir() == tmp_path / "fidmed_weights"
    assert W.resolve_weights(spec) == path


def test_found_in_torch_hub_cache_after_weights_dir(tmp_path: Path) -> None:
    spec = _spec()
    hub = _put(tmp_path / "hub" / "checkpoints", spec.filename)
    assert W.resolve_weights(spec, tmp_path / "empty") == hub
    mine = _put(tmp_path / "mine", spec.filename)
    assert W.resolve_weights(spec, tmp_path / "mine") == mine  # the weights folder comes first


def test_found_in_hugging_face_cache_last(tmp_path: Path, monkeypatch) -> None:
    url = "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/model-1234abcd.pth"
    spec = _spec(urls=(url,))
    repo = tmp_path / "hf" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsMissingError, match="models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"):
        W.resolve_weights(spec, tmp_path / "empty")  # the message names the HF folder it looked in
    _put(repo / "0123abc", "other.pth")  # another file of the same repo is not it
    found = _put(repo / "4567def", spec.filename)
    assert W.resolve_weights(spec, tmp_path / "empty") == found
    hub = _put(tmp_path / "hub" / "checkpoints", spec.filename)
    assert W.resolve_weights(spec, tmp_path / "empty") == hub  # torch hub's folder comes before the HF cache
    # a spec without a huggingface.co URL never looks there
    assert W.hf_cache_paths(_spec()) == [] and W.hf_cache_paths(spec) == [found]


def test_wrong_sha256_names_file_expected_and_actual(tmp_path: Path) -> None:
    spec = _spec()
    _put(tmp_path / "mine", spec.filename, b"something else")
    with pytest.raises(FidmedError) as e:
        W.resolve_weights(spec, tmp_path / "mine")
    msg = str(e.value)
    assert spec.filename in msg and spec.sha256 in msg and hashlib.sha256(b"something else").hexdigest() in msg


def test_sha256_prefix_is_verified_as_prefix(tmp_path: Path) -> None:
    full = hashlib.sha256(PAYLOAD).hexdigest()
    _put(tmp_path / "mine", "m.pth")
    assert W.resolve_weights(W.WeightsSpec("m.pth", full[:8]), tmp_path / "mine").name == "m.pth"
    wrong = "0" * 8 if not full.startswith("0" * 8) else "1" * 8
    with pytest.raises(FidmedError, match="wrong sha256"):
        W.resolve_weights(W.WeightsSpec("m.pth", wrong), tmp_path / "mine")


def _assert_helpful(msg: str, spec: W.WeightsSpec, folder: Path) -> None:
    assert spec.filename in msg and spec.sha256 in msg and str(folder) in msg
    assert "fidmed weights import PATH" in msg
    assert all(u in msg for u in spec.urls)


def test_missing_offline_fails_fast_with_instructions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FIDMED_OFFLINE", "1")
    spec = _spec(urls=("https://example.invalid/model-1234abcd.pth",))
    t0 = time.perf_counter()
    with pytest.raises(WeightsMissingError) as e:
        W.resolve_weights(spec, tmp_path / "mine", allow_download=True)
    assert time.perf_counter() - t0 < 2.0
    _assert_helpful(str(e.value), spec, tmp_path / "mine")
    assert "offline" in str(e.value)


def test_unreachable_url_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _spec(urls=(f"http://127.0.0.1:{port}/model-1234abcd.pth",))
    t0 = time.perf_counter()
    with pytest.raises(WeightsMissingError, match="download failed") as e:
        W.resolve_weights(spec, tmp_path / "mine", allow_download=True)
    assert time.perf_counter() - t0 < 2.0
    _assert_helpful(str(e.value), spec, tmp_path / "mine")


@pytest.fixture
def http_server(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_and_renames_atomically(tmp_path: Path, http_server) -> None:
    root, base = http_server
    spec = _spec(urls=(f"{base}/missing.pth", f"{base}/model-1234abcd.pth"))  # first URL 404s, second works
    _put(root, spec.filename)
    got = W.resolve_weights(spec, tmp_path / "mine", allow_download=True)
    assert got == tmp_path / "mine" / spec.filename and got.read_bytes() == PAYLOAD
    assert not list((tmp_path / "mine").glob("*.partial"))
    # a served file with the wrong content is not kept
    bad = _spec(name="bad.pth", urls=(f"{base}/bad.pth",))
    _put(root, "bad.pth", b"tampered")
    with pytest.raises(WeightsMissingError, match="wrong sha256"):
        W.resolve_weights(bad, tmp_path / "mine", allow_download=True)
    assert not (tmp_path / "mine" / "bad.pth").exists()


def test_import_weights_matches_by_hash(tmp_path: Path) -> None:
    spec = _spec()
    src = _put(tmp_path / "downloads", "renamed-by-browser.pth")
    got_spec, path = W.import_weights(src, [_spec(name="other.pth", payload=b"x"), spec], tmp_path / "mine")
    assert got_spec == spec and path == tmp_path / "mine" / spec.filename and path.read_bytes() == PAYLOAD
    with pytest.raises(FidmedError, match="matches no known weights file"):
        W.import_weights(_put(tmp_path, "junk.pth", b"junk"), [spec], tmp_path / "mine")


# ------------------------------------------------------------------------------------------------ registry
def _inception_cfg(**overrides):
    cfg = OmegaConf.load(CONF)
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_random_init_only_when_allowed_and_labelled() -> None:
    cfg = _inception_cfg(weights_source="random", seed=7)
    with pytest.raises(FidmedError, match="only for plumbing tests"):
        build_extractor(cfg)
    a = build_extractor(cfg, allow_random=True)
    assert a.random_init and a.weights_label == "RANDOM-INIT(seed=7) -- not a real extractor"
    assert a.protocol()["weights"] == a.weights_label
    b = build_extractor(cfg, allow_random=True)
    c = build_extractor(_inception_cfg(weights_source="random", seed=8), allow_random=True)
    wa, wb, wc = (m.net.Mixed_6b.branch7x7_2.conv.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)  # seeded, independent of the global RNG


def test_unknown_extractor_lists_valid_names() -> None:
    assert "inception_tf" in available_extractors()
    with pytest.raises(FidmedError, match="available: .*inception_tf"):
        build_extractor(_inception_cfg(name="no_such_net", module=None), allow_random=True)
    with pytest.raises(ConfigError, match="weights_source"):
        build_extractor(_inception_cfg(weights_source="imagenet"))


def test_pretrained_missing_offline_fails_before_building(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsMissingError, match="pt_inception-2015-12-05-6726825d.pth"):
        build_extractor(_inception_cfg(), weights_dir=tmp_path / "mine", allow_download=True)
    assert time.perf_counter() - t0 < 2.0


def test_check_weights_available_names_every_missing_file(tmp_path: Path) -> None:
    other = {"name": "other_net", "feature_dim": 8, "input_size": 32,
             "weights": {"filename": "other-net.pth", "sha256": hashlib.sha256(b"o").hexdigest()}}
    present = {"name": "present_net", "feature_dim": 8, "input_size": 32,
               "weights": {"filename": "present.pth", "sha256": hashlib.sha256(PAYLOAD).hexdigest()}}
    _put(tmp_path / "mine", "present.pth")
    cfgs = [_inception_cfg(), other, present, _inception_cfg(name="random_one", weights_source="random")]
    with pytest.raises(WeightsMissingError) as e:
        check_weights_available(cfgs[:3], weights_dir=tmp_path / "mine")
    assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value) and "other-net.pth" in str(e.value)
    assert "present.pth" not in str(e.value)
    status = check_weights_available(cfgs, weights_dir=tmp_path / "mine", allow_random=True,
                                     raise_on_missing=False)
    assert {k: s.state for k, s in status.items()} == {
        "inception_tf": "missing", "other_net": "missing", "present_net": "found", "random_one": "random"}
    assert status["present_net"].path == tmp_path / "mine" / "present.pth"
    with pytest.raises(FidmedError, match="random is not allowed"):
        check_weights_available(cfgs[2:], weights_dir=tmp_path / "mine")


def test_unpinned_weights_are_used_as_found_and_record_their_own_digest(tmp_path):
    """A file with no published sha256 (spec sha256=None) is neither refused nor silently replaced: results carry
    the digest of the local file, marked unpinned, and `fidmed weights import` recognises it by name."""
    import hashlib

    from fidmed.features.weights import WeightsSpec, import_weights, resolve_weights, sha256_of

    spec = WeightsSpec("model_unpinned.pth", None, ("http://127.0.0.1:9/none",))
    assert not spec.pinned and not spec.full_hash
    src = tmp_path / "download" / "model_unpinned.pth"
    src.parent.mkdir()
    src.write_bytes(b"some weights")
    _, dest = import_weights(src, [spec], tmp_path / "w")
    assert resolve_weights(spec, tmp_path / "w") == dest
    assert sha256_of(dest) == hashlib.sha256(b"some weights").hexdigest()
    with pytest.raises(WeightsMissingError, match="unpinned"):
        resolve_weights(spec, tmp_path / "elsewhere")
