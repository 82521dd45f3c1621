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
from fidmed.features.base import Extractor, load_strict, read_checkpoint, seeded_init_
from fidmed.features.registry import (
    EXTRACTORS,
    ExtractorInfo,
    build_extractor,
    check_weights_available,
    default_config,
)

PAYLOAD = b"not really weights, but bytes with a known digest\n" * 100


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> None:
    """No test touches ~/.cache or the network: private weights and hub folders, offline flags cleared."""
    monkeypatch.setenv("FIDMED_WEIGHTS", str(tmp_path / "fidmed_weights"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("FIDMED_OFFLINE", raising=False)


def _spec(name: str = "model-1234abcd.pth", urls: tuple[str, ...] = (), payload: bytes = PAYLOAD) -> W.WeightsFile:
    return W.WeightsFile(name, hashlib.sha256(payload).hexdigest(), urls, "test weights", "ask the test")


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
    assert W.resolve_weights(W.WeightsFile("m.pth", full[:8]), tmp_path / "mine").name == "m.pth"
    wrong = "0" * 8 if not full.startswith("0" * 8) else "1" * 8
    with pytest.raises(FidmedError, match="wrong sha256"):
        W.resolve_weights(W.WeightsFile("m.pth", wrong), tmp_path / "mine")


def _assert_helpful(msg: str, spec: W.WeightsFile, folder: Path) -> None:
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


def _no_load(wfile: W.WeightsFile, path: Path) -> str:
    raise FidmedError(f"{path} does not load into the network of {wfile.filename}")


def test_import_weights_matches_by_hash(tmp_path: Path) -> None:
    spec = _spec()
    src = _put(tmp_path / "downloads", "renamed-by-browser.pth")
    done = W.import_weights(src, [_spec(name="other.pth", payload=b"x"), spec], _no_load, tmp_path / "mine")
    assert done.file == spec and done.path == tmp_path / "mine" / spec.filename and done.path.read_bytes() == PAYLOAD
    assert done.verified == f"sha256 {spec.sha256} matches the published digest"
    with pytest.raises(FidmedError, match="matches no known weights file"):
        W.import_weights(_put(tmp_path, "junk.pth", b"junk"), [spec], _no_load, tmp_path / "mine")
    # a file named like a pinned one but with another digest: said so, with the fix
    with pytest.raises(FidmedError, match=r"named like model-1234abcd.pth but its sha256 .* Get it again"):
        W.import_weights(_put(tmp_path, spec.filename, b"junk"), [spec], _no_load, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [spec.filename, spec.filename + ".sha256.json"]


# ------------------------------------------------------------------------------------------------ registry
def _inception_cfg(**overrides):
    """inception_tf's user-facing config (a DictConfig, as Hydra composes it) with overrides."""
    return OmegaConf.merge(OmegaConf.structured(default_config("inception_tf")), overrides)


def test_random_init_only_when_allowed_and_labelled() -> None:
    cfg = _inception_cfg(weights_source="random", seed=7)
    with pytest.raises(FidmedError, match="only for plumbing tests"):
        build_extractor(cfg)
    a = build_extractor(cfg, allow_random=True)
    assert a.random_init and a.weights_label == "RANDOM-INIT(seed=7) -- not a real extractor"
    assert a.random_init_reason == "chosen on purpose (weights_source=random)"
    assert a.protocol()["weights"] == a.weights_label
    b = build_extractor(cfg, allow_random=True)
    c = build_extractor(_inception_cfg(weights_source="random", seed=8), allow_random=True)
    wa, wb, wc = (m.net.Mixed_6b.branch7x7_2.conv.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)  # seeded, independent of the global RNG


def test_unknown_extractor_or_key_lists_valid_ones() -> None:
    assert "inception_tf" in EXTRACTORS.names()
    with pytest.raises(ConfigError, match="unknown extractor 'no_such_net'; available: .*inception_tf"):
        build_extractor({"name": "no_such_net"}, allow_random=True)
    with pytest.raises(ConfigError, match="weights_source"):
        build_extractor(_inception_cfg(weights_source="imagenet"))
    # the facts of a registration are not config keys: a YAML-era key is refused, naming the ones that exist
    with pytest.raises(
        ConfigError,
        match=r"unknown key\(s\) feature_dim, weights; .*name, input_size, resizer, "
        r"weights_source, seed",
    ):
        build_extractor({"name": "inception_tf", "feature_dim": 8, "weights": {}})


def test_pretrained_missing_offline_fails_before_building(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsMissingError, match="pt_inception-2015-12-05-6726825d.pth"):
        build_extractor(_inception_cfg(), weights_dir=tmp_path / "mine", allow_download=True)
    assert time.perf_counter() - t0 < 2.0


def test_missing_weights_message_names_every_way_forward(tmp_path: Path, monkeypatch) -> None:
    """Online: the download command and the download switches of run.py and `fidmed evaluate` (not a vague
    "allow downloads"); offline: import; and how to run without real weights at all."""
    monkeypatch.setenv("FIDMED_OFFLINE", "1")
    with pytest.raises(WeightsMissingError) as e:
        build_extractor("inception_tf", weights_dir=tmp_path / "mine", allow_download=True)
    msg = str(e.value)
    for fix in (
        "`fidmed weights download inception_tf`",
        "`eval.allow_download=true`",
        "`fidmed evaluate --allow-download`",
        "`fidmed weights import PATH`",
        "eval.weights=random",
        "experiment=smoke",
        "--weights random",
    ):
        assert fix in msg, fix
    with pytest.raises(WeightsMissingError) as e:  # RadImageNet: no URL, so no download advice
        build_extractor("radimagenet_resnet", weights_dir=tmp_path / "mine")
    assert "cannot be downloaded" in str(e.value) and "fidmed weights download" not in str(e.value)
    assert "eval.weights=random" in str(e.value)


def test_random_substituted_for_missing_weights_says_so(tmp_path: Path, monkeypatch) -> None:
    """Random weights chosen on purpose and random weights substituted for a missing file are told apart."""
    monkeypatch.setenv("FIDMED_OFFLINE", "1")
    sub = build_extractor("inception_tf", weights_dir=tmp_path / "mine", allow_download=True, random_if_missing=True)
    chosen = build_extractor({"name": "inception_tf", "weights_source": "random"}, allow_random=True)
    assert sub.random_init and chosen.random_init
    assert sub.random_init_reason == "substituted: its weights file pt_inception-2015-12-05-6726825d.pth is missing"
    assert chosen.random_init_reason == "chosen on purpose (weights_source=random)"
    assert sub.protocol()["random_init_reason"] == sub.random_init_reason
    # same seed, same network: only the reason differs
    assert torch.equal(sub.net.Mixed_7c.branch_pool.conv.weight, chosen.net.Mixed_7c.branch_pool.conv.weight)
    _put(tmp_path / "mine", "pt_inception-2015-12-05-6726825d.pth", b"corrupt")  # a wrong digest is never papered over
    with pytest.raises(FidmedError, match="wrong sha256"):
        build_extractor("inception_tf", weights_dir=tmp_path / "mine", random_if_missing=True)


# ------------------------------------------------------------------------------------------------ a toy extractor
class ToyExtractor(Extractor):
    """A tiny CNN registered from this test module alone: conv, ReLU, global average pool -> 8-d."""

    def __init__(self, setup, weights_path: Path | None) -> None:
        super().__init__(setup, weights_path)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        if weights_path is None:
            seeded_init_(self.net, setup.seed)
        else:
            load_strict(self.net, read_checkpoint(weights_path, "toy"), weights_path, "toy CNN")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.net(x / 255.0)


def build_toy(setup, weights_path: Path | None) -> ToyExtractor:
    return ToyExtractor(setup, weights_path)


def _toy_info(weights: W.WeightsFile | None = None) -> ExtractorInfo:
    return ExtractorInfo(
        study_name="Toy",
        feature_dim=8,
        input_size=16,
        resizer="clean",
        weights=weights,
        network="toy CNN",
        description="a test-only extractor",
    )


@pytest.fixture
def register_toy():
    """register_toy(name, weights=None): register the toy builder under ``name``; unregistered after the test."""
    names = []

    def register(name: str, weights: W.WeightsFile | None = None) -> None:
        EXTRACTORS.add(name, build_toy, info=_toy_info(weights))
        names.append(name)

    yield register
    for name in names:
        EXTRACTORS.remove(name)


def test_toy_extractor_registered_from_a_test_module(register_toy) -> None:
    register_toy("toy")
    assert "toy" in EXTRACTORS.names() and default_config("toy").input_size == 16
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    # registered without a weights file: random init is its default, and still needs allow_random
    assert default_config("toy").weights_source == "random"
    with pytest.raises(FidmedError, match="only for plumbing tests"):
        build_extractor("toy")
    with pytest.raises(ConfigError, match="has no pretrained weights file; .*extractor.toy.weights_source=random"):
        build_extractor({"name": "toy", "weights_source": "pretrained"})
    a = build_extractor("toy", allow_random=True)
    b = build_extractor({"name": "toy", "weights_source": "random"}, allow_random=True)
    c = build_extractor(OmegaConf.merge(OmegaConf.structured(default_config("toy")), {"seed": 0}), allow_random=True)
    with torch.no_grad():
        fa, fb, fc = a(x), b(x), c(x)
    assert fb.shape == (3, 8) and fb.dtype == torch.float32 and torch.equal(fa, fb) and torch.equal(fb, fc)
    assert (b.name, b.study_name, b.feature_dim, b.preprocessing.key) == ("toy", "Toy", 8, "clean-16-RGB")
    assert b.random_init and b.weights_label.startswith("RANDOM-INIT")
    with pytest.raises(FidmedError, match=r"\[N, 3, 16, 16\]"):
        b(torch.zeros(1, 3, 8, 8))


def test_check_weights_available_names_every_missing_file(tmp_path: Path, register_toy) -> None:
    register_toy("other_net", W.WeightsFile("other-net.pth", hashlib.sha256(b"o").hexdigest()))
    register_toy("present_net", W.WeightsFile("present.pth", hashlib.sha256(PAYLOAD).hexdigest()))
    register_toy("toy")
    _put(tmp_path / "mine", "present.pth")
    cfgs = [_inception_cfg(), "other_net", {"name": "present_net"}, {"name": "toy", "weights_source": "random"}]
    with pytest.raises(WeightsMissingError) as e:
        check_weights_available(cfgs[:3], weights_dir=tmp_path / "mine")
    assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value) and "other-net.pth" in str(e.value)
    assert "present.pth" not in str(e.value)
    status = check_weights_available(cfgs, weights_dir=tmp_path / "mine", allow_random=True, raise_on_missing=False)
    assert {k: s.state for k, s in status.items()} == {
        "inception_tf": "missing",
        "other_net": "missing",
        "present_net": "found",
        "toy": "random",
    }
    assert status["present_net"].path == tmp_path / "mine" / "present.pth"
    with pytest.raises(FidmedError, match="random is not allowed"):
        check_weights_available(cfgs[2:], weights_dir=tmp_path / "mine")


def test_unpinned_weights_are_used_as_found_and_record_their_own_digest(tmp_path):
    """A file with no published sha256 (sha256=None) is neither refused nor silently replaced: results carry
    the digest of the local file, marked unpinned; `fidmed weights import` takes it only if it loads."""
    spec = W.WeightsFile("model_unpinned.pth", None, ("http://127.0.0.1:9/none",))
    assert not spec.pinned and not spec.full_hash
    src = tmp_path / "download" / "model_unpinned.pth"
    src.parent.mkdir()
    src.write_bytes(b"some weights")
    with pytest.raises(FidmedError, match="does not load"):
        W.import_weights(src, [spec], _no_load, tmp_path / "w")
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").iterdir())  # nothing left behind
    done = W.import_weights(src, [spec], lambda wfile, path: "loaded into a test net", tmp_path / "w")
    digest = hashlib.sha256(b"some weights").hexdigest()
    assert done.verified == f"loaded into a test net; sha256 {digest} recorded (unpinned)"
    assert W.resolve_weights(spec, tmp_path / "w") == done.path
    assert W.sha256_of(done.path) == digest
    with pytest.raises(WeightsMissingError, match="unpinned"):
        W.resolve_weights(spec, tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------------ `fidmed weights`
def _swav_checkpoint(path: Path) -> Path:
    """Random weights in SwAV's release layout (``module.`` prefix, projection head, prototypes)."""
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    seeded_init_(net, 3)
    ckpt = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    ckpt["module.prototypes.weight"] = torch.zeros(30, 128)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def test_weights_import_loads_unpinned_files_before_accepting_them(tmp_path: Path, capsys) -> None:
    """Random bytes named like SwAV's or DINO's release file are refused; a real SwAV checkpoint is accepted and
    the message says what was verified (it loaded; its own sha256 is recorded), not "sha256 None verified"."""
    from fidmed.cli import main

    junk = _put(tmp_path / "dl", "swav_800ep_pretrain.pth.tar", b"random bytes, not a checkpoint")
    dino = _put(tmp_path / "dl", "dino_deitsmall8_pretrain.pth", b"random bytes, not a checkpoint")
    for fake in (junk, dino):
        assert main(["weights", "import", str(fake), "--weights-dir", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err
        assert f"cannot read the {'SwAV' if fake is junk else 'DINO'} weights file {fake}" in err, err
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").iterdir())  # nothing left behind

    swav = _swav_checkpoint(tmp_path / "dl2" / "swav_800ep_pretrain.pth.tar")
    assert main(["weights", "import", str(swav), "--weights-dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(swav.read_bytes()).hexdigest()
    assert (
        f"-> {tmp_path / 'w' / 'swav_800ep_pretrain.pth.tar'}: loaded into SwAV ResNet-50: 2048-d features; "
        f"sha256 {digest} recorded (unpinned)"
    ) in out
    assert "None" not in out


def test_weights_import_pinned_file_by_digest_under_any_name(tmp_path: Path, capsys, register_toy) -> None:
    from fidmed.cli import main

    toy = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2))
    torch.save({f"0.{k}": v for k, v in toy[0].state_dict().items()}, tmp_path / "toy-weights (2).pth")
    digest = hashlib.sha256((tmp_path / "toy-weights (2).pth").read_bytes()).hexdigest()
    register_toy("toy_pinned", W.WeightsFile("toy_pinned-abcdef12.pth", digest))
    assert main(["weights", "import", str(tmp_path / "toy-weights (2).pth"), "--weights-dir", str(tmp_path / "w")]) == 0
    assert f"toy_pinned-abcdef12.pth: sha256 {digest} matches the published digest" in capsys.readouterr().out
    ex = build_extractor("toy_pinned", weights_dir=tmp_path / "w")
    assert ex.weights_label == f"sha256:{digest}" and not ex.random_init
    assert main(["weights", "list", "--weights-dir", str(tmp_path / "w")]) == 0
    listing = capsys.readouterr().out
    assert "toy_pinned" in listing and "present" in listing and "UNPINNED" in listing  # swav & co are unpinned


def test_weights_module_knows_nothing_about_networks() -> None:
    """No import circle: the generic weights module imports neither the registry nor any architecture."""
    import subprocess
    import sys

    code = (
        "import sys, fidmed.features.weights; "
        "bad = [m for m in sys.modules if m.startswith(('fidmed.features.registry', 'fidmed.features.keras', "
        "'fidmed.features.extractors', 'fidmed.features.base'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
