"""Evaluation speed options: channels_last (opt-in, for the extractors that declare it safe) and ``eval.compile`` (torch.compile).

Neither may change a number beyond float32 rounding: every registered extractor that declares ``channels_last``
gives fp32 features within ``CHANNELS_LAST_RTOL`` of the contiguous ones (the vision transformers bit-identical),
and compiled features are within ``COMPILE_RTOL`` of eager (fidmed.features.base). Tiny input sizes and shallow
transformers keep this fast; compiling real networks is in the ``slow`` tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fidmed.data.phantom import PhantomDataset
from fidmed.errors import FidmedError
from fidmed.evaluation.evaluator import Evaluator
from fidmed.evaluation.sources import DatasetSource
from fidmed.features.base import (
    CHANNELS_LAST_RTOL,
    COMPILE_RTOL,
    Extractor,
    ForwardPath,
    forward_path,
    set_forward_path,
)
from fidmed.features.preprocess import Preprocessing
from fidmed.features.registry import EXTRACTORS, build_extractor

from conftest import extractor_cfg

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# The smallest input each registered network takes (fixed-size transformers at 224 with 1 block where the
# registration has a ``depth`` option); the Keras networks at their architecture's minimum.
TINY = {
    "inception_tf": dict(input_size=299),
    "inception": dict(input_size=75),
    "resnet": dict(input_size=32),
    "swav": dict(input_size=32),
    "dino": dict(input_size=224),
    "swin": dict(input_size=224),
    "dinov2": dict(input_size=224, depth=1),
    "clip": dict(input_size=224, depth=1),
    "irv2": dict(input_size=75),
    "densenet": dict(input_size=32),
    "keras_inception": dict(input_size=75),
    "keras_resnet": dict(input_size=32),
    "radimagenet_inception": dict(input_size=75),
    "radimagenet_resnet": dict(input_size=32),
    "radimagenet_irv2": dict(input_size=75),
    "radimagenet_densenet": dict(input_size=32),
}
TRANSFORMERS = ("dino", "swin", "dinov2", "clip")


def tiny_extractor(name: str) -> Extractor:
    return build_extractor(extractor_cfg(name, weights_source="random", **TINY[name]), allow_random=True)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Preprocessed-like float32 input in [0, 255]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def rel_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the measure CHANNELS_LAST_RTOL and COMPILE_RTOL bound."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


class ConvToy(nn.Module):
    """A small conv-BN-ReLU network with the extractor attributes: fast to run and to compile."""

    channels_last = True

    def __init__(self, name: str = "convtoy", size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.name, self.study_name, self.feature_dim = name, name, 24
        self.weights_label, self.random_init = f"toy-{seed}", True
        self.preprocessing = Preprocessing(resizer="nearest", size=size, channels="RGB")
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        with torch.no_grad():  # non-trivial running statistics
            for m in self.net:
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        self.seen_channels_last: list[bool] = []
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] > 1)
        return self.net(x / 255.0 - 0.5)


def phantoms(n: int, seed: int, size: int = 16) -> DatasetSource:
    return DatasetSource(PhantomDataset(n, size, seed=seed))


def fd_values(records) -> dict[tuple[str, str], float]:
    return {(r.extractor, r.metric): r.value for r in records}


# ------------------------------------------------------------------------------------------------ channels_last
@pytest.mark.parametrize("name", sorted(EXTRACTORS.names()))
def test_channels_last_leaves_fp32_features_within_float32_rounding(name):
    if name not in TINY:
        pytest.skip(f"{name}: no tiny size known to this test (a plugin's extractor)")
    ex = tiny_extractor(name)
    x = images(2, ex.preprocessing.size)
    with torch.no_grad():
        contiguous = ex(x)
        path = set_forward_path(ex, channels_last=True)
        assert path.channels_last == ex.channels_last
        if not path.channels_last:
            pytest.skip(f"{name} runs contiguous (it does not declare channels_last)")
        last = path(path.prepare(x))
    convs = [m for m in ex.modules() if isinstance(m, nn.Conv2d) or type(m).__name__ == "TFConv2d"]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    dev = rel_dev(last, contiguous)
    assert dev <= CHANNELS_LAST_RTOL, f"{name}: channels_last deviates {dev:.2e} from contiguous"
    if name in TRANSFORMERS:  # only the patch embedding is a convolution
        assert torch.equal(last, contiguous)
    set_forward_path(ex, channels_last=False)
    assert all(m.weight.is_contiguous() for m in convs)
    with torch.no_grad():
        assert torch.equal(forward_path(ex)(x), contiguous)  # back to exactly the contiguous computation


def test_the_evaluator_runs_contiguous_by_default_and_channels_last_on_request():
    real, gen = phantoms(12, 0), phantoms(10, 1)
    on_toy, off_toy = ConvToy(), ConvToy()
    on = Evaluator([on_toy], real, device="cpu", batch_size=4, num_workers=0, channels_last=True)
    off = Evaluator([off_toy], real, device="cpu", batch_size=4, num_workers=0)
    assert forward_path(on_toy).channels_last and not forward_path(off_toy).channels_last
    a, b = fd_values(on.evaluate(gen)), fd_values(off.evaluate(gen))
    assert any(on_toy.seen_channels_last) and not any(off_toy.seen_channels_last)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    # an extractor that does not declare channels_last (a plugin's, the toys of other tests) stays contiguous
    plain = ConvToy("plain")
    plain.channels_last = False
    Evaluator([plain], real, device="cpu", channels_last=True)
    assert not forward_path(plain).channels_last


def test_channels_last_fd_of_a_registered_network_within_tolerance():
    """resnet (random init, 32 px phantoms): FD and relative FD with channels_last vs contiguous, fp32."""
    ex = tiny_extractor("resnet")
    real, gen = phantoms(14, 0, 32), phantoms(12, 1, 32)
    kw = dict(device="cpu", batch_size=5, num_workers=0, metrics=["fd", "rfd"])
    last = fd_values(Evaluator([ex], real, channels_last=True, **kw).evaluate(gen))
    contiguous = fd_values(Evaluator([ex], real, **kw).evaluate(gen))
    for key in last:
        assert last[key] == pytest.approx(contiguous[key], rel=1e-4), key


def test_bf16_path_runs_channels_last_on_request():
    ex = tiny_extractor("keras_resnet")
    real, gen = phantoms(8, 0, 32), phantoms(8, 1, 32)
    kw = dict(device="cpu", batch_size=4, num_workers=0, metrics=["fd"])
    fp32 = fd_values(Evaluator([ex], real, **kw).evaluate(gen))
    bf16 = fd_values(Evaluator([ex], real, precision="bf16", channels_last=True, **kw).evaluate(gen))
    assert forward_path(ex).channels_last
    value, ref = bf16[("keras_resnet", "fd")], fp32[("keras_resnet", "fd")]
    assert np.isfinite(value) and value != ref and value == pytest.approx(ref, rel=0.2)


# ------------------------------------------------------------------------------------------------ compile
def test_compiled_evaluation_is_within_tolerance_of_eager():
    real, gen = phantoms(12, 0), phantoms(10, 1)
    eager_toy, compiled_toy = ConvToy(), ConvToy()
    kw = dict(device="cpu", batch_size=4, num_workers=0, metrics=["fd", "rfd"])
    eager = fd_values(Evaluator([eager_toy], real, **kw).evaluate(gen))
    ev = Evaluator([compiled_toy], real, compile=True, **kw)
    path = forward_path(compiled_toy)
    assert path.compiled and not path.channels_last and path.key == "contiguous+compiled"
    compiled = fd_values(ev.evaluate(gen))
    assert path.compiled_fn is not None  # the evaluation ran through torch.compile
    for key in eager:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-9), key
    x = images(4, 16, seed=3)
    with torch.no_grad():
        assert rel_dev(path(path.prepare(x)), eager_toy(x)) <= COMPILE_RTOL


def test_compiled_graphs_are_kept_when_an_evaluator_is_made_again():
    toy = ConvToy()
    first = set_forward_path(toy, compile=True)
    first.compiled_fn = sentinel = object()
    assert set_forward_path(toy, compile=True).compiled_fn is sentinel
    assert set_forward_path(toy, channels_last=True, compile=True).compiled_fn is sentinel  # guards on the layout
    assert set_forward_path(toy, compile=False).compiled_fn is None


def test_a_compiler_failure_is_one_line_naming_the_fix(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    def failing_compile(module, **kwargs):
        def run(x):
            raise TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found\nlong traceback ...")

        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    path = set_forward_path(ConvToy(), compile=True)
    with pytest.raises(FidmedError) as info:
        path(images(2, 16))
    text = str(info.value)
    assert "\n" not in text and "InvalidCxxCompiler" in text and "eval.compile=false" in text
    # an error of fidmed's own inside the compiled forward (a wrong input) is not rewritten
    ex = tiny_extractor("resnet")
    with pytest.raises(FidmedError, match="expects float32"):
        ForwardPath(ex, compiled=False)(torch.zeros(1, 3, 8, 8))


def test_config_and_cli_options_reach_the_evaluator(compose_cfg):
    from fidmed.evaluation.cli import eval_config
    from fidmed.job import evaluator_from_config

    cfg = compose_cfg(["eval.compile=true", "eval.channels_last=true"])
    toy = ConvToy()
    ev = evaluator_from_config(cfg.eval, [toy], phantoms(4, 0), None)
    assert ev.compile and ev.channels_last
    assert forward_path(toy).compiled and forward_path(toy).channels_last
    defaults = compose_cfg([]).eval
    assert defaults.channels_last is False and defaults.compile is False

    from fidmed.cli import build_parser

    args = build_parser().parse_args(["evaluate", "gen", "real", "--compile", "--channels-last"])
    ev_cfg = eval_config(args).eval
    assert ev_cfg.compile is True and ev_cfg.channels_last is True
    args = build_parser().parse_args(["evaluate", "gen", "real"])
    ev_cfg = eval_config(args).eval
    assert ev_cfg.compile is False and ev_cfg.channels_last is False


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "keras_resnet", "dino"])
def test_compiled_registered_extractors_within_tolerance_of_eager(name):
    """torch.compile of real networks (random init, tiny inputs): fp32 features within COMPILE_RTOL of eager,
    channels_last and contiguous; bf16 autocast compiles too. About a minute per network on a 2-core CPU."""
    ex = tiny_extractor(name)
    x = images(3, ex.preprocessing.size, seed=1)
    with torch.no_grad():
        eager = ex(x)
        for channels_last in (True, False):
            path = set_forward_path(ex, channels_last=channels_last, compile=True)
            dev = rel_dev(path(path.prepare(x)), eager)
            assert dev <= COMPILE_RTOL, f"{name} compiled ({path.key}) deviates {dev:.2e} from eager"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = path(path.prepare(x)).float()
    assert torch.isfinite(bf16).all() and rel_dev(bf16, eager) < 0.2


def test_forward_path_is_in_the_protocol_and_keeps_real_caches_apart(tmp_path):
    """A real-statistics cache written on one forward path is never used on another (their last bits differ);
    the default contiguous path adds no key, so caches written before the option existed stay valid."""
    real, gen = phantoms(12, 0), phantoms(10, 1)
    assert real.description.get("manifest_sha256"), "the cache needs a manifest hash"
    toy = ConvToy()
    kw = dict(device="cpu", batch_size=4, num_workers=0, metrics=["fd"], cache_dir=tmp_path)
    ev = Evaluator([toy], real, **kw)
    assert "forward_path" not in ev._real_record(toy)
    (rec,) = ev.evaluate(gen)
    assert rec.protocol["forward_path"] == "contiguous"
    assert len(list(tmp_path.glob("real-*.npz"))) == 1
    (rec,) = Evaluator([toy], real, channels_last=True, **kw).evaluate(gen)
    assert rec.protocol["forward_path"] == "channels_last"
    assert len(list(tmp_path.glob("real-*.npz"))) == 2  # computed anew, not read from the contiguous entry
    (again,) = Evaluator([toy], real, **kw).evaluate(gen)
    assert again.protocol["forward_path"] == "contiguous" and len(list(tmp_path.glob("real-*.npz"))) == 2
