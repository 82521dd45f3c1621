"""The compiled training path (``model.compile=true``): which passes run compiled, compiled against eager numerics,
the module under a real Trainer, the fingerprint and the checks before training.

torch.compile's AOTAutograd cannot differentiate twice, so only the passes differentiated once (G main, D main) may
run compiled; R1 and path length run the same modules eagerly. Two backends are compared with eager:

- ``aot_eager`` (dynamo and AOTAutograd, the traced ATen graph replayed without code generation): equal to eager bit
  for bit on the CPU; seconds, in the fast suite;
- ``inductor`` (what ``model.compile=true`` uses: generated, fused C++ kernels): each gradient tensor within
  ``1e-4 * max|eager gradient|`` of eager (measured up to 1.9e-6 with these networks), the losses within 1e-5
  relative, the same random stream. Compiling with a C++ compiler takes minutes on a small CPU: marked slow.
"""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf

import fidmed.gan.loss as loss_module
from fidmed.errors import FidmedError
from fidmed.gan.loss import CompiledNetworks, StyleGAN2Loss
from fidmed.gan.module import StyleGAN2Module

from helpers.training import TINY_MODEL as TINY
from helpers.training import cpu_trainer, tiny_networks

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

BATCH = 4
INDUCTOR_GRAD_TOLERANCE = 1e-4  # of each gradient tensor's largest |value|
INDUCTOR_LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code of earlier tests is not reused (each test compiles what it checks)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, 1, 16, 16, generator=g) * 2 - 1, torch.randn(BATCH, 32, generator=g)


def run_phase(loss: StyleGAN2Loss, phase: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """One phase from fixed inputs and seed: (statistics, gradients of the trained network, next random number)."""
    network = loss.G if phase.startswith("G") else loss.D
    for p in network.parameters():
        p.grad = None
    network.requires_grad_(True)
    real, z = inputs()
    torch.manual_seed(5)
    stats = loss.accumulate_gradients(phase=phase, real_img=real, real_c=None, gen_z=z, gen_c=None, gain=1.0)
    grads = {name: p.grad.detach().clone() for name, p in network.named_parameters()}
    return stats, grads, float(torch.randn([]))  # the stream's position after the phase


# --------------------------------------------------------------------------------------------------------
# Which passes run compiled.
def test_only_passes_differentiated_once_run_compiled():
    """G main, D main's generated images and D main's real images (when R1 is not computed on them) go through the
    compiled networks; the path-length and R1 passes, which differentiate twice, never do."""
    G, D = tiny_networks()
    loss = StyleGAN2Loss(G, D, r1_gamma=1.0)
    assert not loss.compiled
    calls: list[str] = []

    def recording(name: str, module: torch.nn.Module):
        def call(*args, **kwargs):
            calls.append(name)
            return module(*args, **kwargs)

        return call

    loss._compiled = CompiledNetworks(
        recording("mapping", G.mapping), recording("synthesis", G.synthesis), recording("D", D)
    )
    assert loss.compiled
    generate = ["mapping", "mapping", "synthesis"]  # style mixing maps a second z
    expected = {
        "Gmain": [*generate, "D"],
        "Greg": [],
        "Dmain": [*generate, "D", "D"],  # generated images, then real images
        "Dreg": [],
        "Gboth": [*generate, "D"],  # its main part; path length eager
        "Dboth": [*generate, "D"],  # generated images only: the real images' pass feeds R1
    }
    for phase, names in expected.items():
        calls.clear()
        run_phase(loss, phase)
        assert calls == names, phase


def test_compiled_networks_stay_out_of_the_state_dict():
    G, D = tiny_networks()
    eager = StyleGAN2Loss(G, D)
    compiled = StyleGAN2Loss(G, D, compile="aot_eager")
    assert compiled.compiled and list(compiled.state_dict()) == list(eager.state_dict()) == ["pl_mean"]
    # the compiled twins hold the very parameters of G and D
    assert next(compiled._compiled.D.parameters()) is next(D.parameters())


# --------------------------------------------------------------------------------------------------------
# Numerics against eager.
@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_compiled_phases_match_eager(backend):
    """Every phase compiled (with R1 and path length eager inside) against the eager loss, from the same weights,
    inputs and seed: aot_eager bit for bit, inductor within the module docstring's tolerances; both draw the same
    random numbers (inductor with ``fallback_random``)."""
    eager = StyleGAN2Loss(*tiny_networks(), r1_gamma=1.0)
    compiled = StyleGAN2Loss(*tiny_networks(), r1_gamma=1.0, compile=True if backend == "inductor" else backend)
    for phase in ("Gmain", "Dmain", "Gboth", "Dboth"):
        stats_e, grads_e, next_e = run_phase(eager, phase)
        stats_c, grads_c, next_c = run_phase(compiled, phase)
        assert next_c == next_e, f"{phase}: the compiled phase consumed another amount of random numbers"
        assert stats_c.keys() == stats_e.keys()
        for name in grads_e:
            if backend == "aot_eager":
                assert torch.equal(grads_c[name], grads_e[name]), f"{phase} {name}"
            else:
                limit = INDUCTOR_GRAD_TOLERANCE * float(grads_e[name].abs().max())
                difference = float((grads_c[name] - grads_e[name]).abs().max())
                assert difference <= limit, f"{phase} {name}: {difference:.3g} > {limit:.3g}"
        for key in stats_e:
            if backend == "aot_eager":
                assert torch.equal(stats_c[key], stats_e[key]), f"{phase} {key}"
            else:
                torch.testing.assert_close(stats_c[key], stats_e[key], rtol=INDUCTOR_LOSS_RTOL, atol=1e-6)
    # the losses' running path-length mean moved alike
    assert float(compiled.pl_mean) == pytest.approx(float(eager.pl_mean), rel=INDUCTOR_LOSS_RTOL)


# --------------------------------------------------------------------------------------------------------
# The module under a real Trainer.


def one_step(compile: bool) -> StyleGAN2Module:
    torch.manual_seed(0)
    module = StyleGAN2Module(OmegaConf.create({**TINY, "compile": compile}), resolution=16, channels=1, kimg=1.0)
    batch = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    cpu_trainer(1).fit(module, torch.utils.data.DataLoader(list(batch), batch_size=8))
    return module


def test_model_compile_trains_like_eager_under_lightning(monkeypatch):
    """model.compile=true reaches the loss; one iteration (G main and D main compiled, G reg and D reg eager, every
    backward pass through Lightning's manual_backward) gives the eager module's weights, EMA and path-length mean:
    bit for bit with the tracing backend, which checks the wiring without minutes of C++ compilation."""
    monkeypatch.setattr(
        loss_module, "compile_networks", functools.partial(loss_module.compile_networks, backend="aot_eager")
    )
    eager, compiled = one_step(False), one_step(True)
    assert compiled.loss.compiled and not eager.loss.compiled
    assert compiled.hparams["model_cfg"]["compile"] is True
    state_e, state_c = eager.state_dict(), compiled.state_dict()
    assert list(state_c) == list(state_e)
    for key, value in state_e.items():
        assert torch.equal(state_c[key], value), key
    assert int(compiled.iteration) == 1 and float(compiled.loss.pl_mean) != 0.0


def test_module_without_the_compile_setting_trains_eagerly():
    """Hyperparameters saved before model.compile existed (older last.ckpt files) rebuild an eager module."""
    module = StyleGAN2Module(OmegaConf.create(TINY), resolution=16, channels=1, kimg=1.0)
    assert not module.loss.compiled


# --------------------------------------------------------------------------------------------------------
# Configuration, fingerprint and the checks before training.
def test_a_compiled_run_has_its_own_fingerprint_and_eager_ones_are_unchanged(compose_cfg):
    """Compiled weights differ from eager ones in their last bits: one fingerprint must not name both (a compiled
    job must not resume or reuse an eager generator); the eager default adds no key (pinned values in
    tests/test_training.py)."""
    from fidmed.gan.fingerprint import fingerprint_record, training_fingerprint

    plain, compiled = compose_cfg(), compose_cfg(["model.compile=true"])
    assert plain.model.compile is False and compiled.model.compile is True
    assert training_fingerprint(compiled) != training_fingerprint(plain)
    assert fingerprint_record(compiled)["model"]["compile"] is True
    assert "compile" not in fingerprint_record(plain)["model"]
    assert training_fingerprint(compose_cfg(["model.compile=true", "model.r1_gamma=1"])) != training_fingerprint(plain)


def test_compile_without_a_cxx_compiler_is_one_clear_error(compose_cfg, monkeypatch):
    import fidmed.gan.train as train

    monkeypatch.setattr(train, "_find_cxx", lambda: None)
    train.check_compile(compose_cfg().model, compose_cfg().trainer)  # model.compile=false needs nothing
    cfg = compose_cfg(["model.compile=true"])
    with pytest.raises(FidmedError, match=r"needs a C\+\+ compiler .* apt-get install g\+\+.*model\.compile=false"):
        train.check_training(cfg)
    assert not (train.train_dir_for(cfg)).exists()  # refused before anything was created


def test_compile_on_cuda_without_triton_is_one_clear_error(compose_cfg, monkeypatch):
    import torch.utils._triton

    import fidmed.gan.train as train

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    cfg = compose_cfg(["model.compile=true"])
    with pytest.raises(FidmedError, match=r"needs Triton.*pip install triton.*model\.compile=false"):
        train.check_compile(cfg.model, OmegaConf.create({"accelerator": "gpu"}))
