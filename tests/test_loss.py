"""StyleGAN2Loss (fidmed.gan.loss).

During development the gradients of every phase were compared with stylegan2-ada-pytorch's
training/loss.py StyleGAN2Loss (commit d72cc7d041b42ec8e806021a205ed9349f87c6a4) on CPU, same seeds and weights,
with and without labels and with a grid_sample augmentation: equal bit for bit. These tests check the properties
that matter to the training loop without the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fidmed.gan.loss import PHASES, StyleGAN2Loss

from helpers.training import tiny_networks

BATCH = 4


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def rotate(images: torch.Tensor, angle: float = 0.4) -> torch.Tensor:
    """A differentiable geometric augmentation (grid_sample), like ADA's rotation."""
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def batch(c_dim: int = 0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(BATCH, 1, 16, 16, generator=g) * 2 - 1
    z = torch.randn(BATCH, 32, generator=g)
    c = torch.randn(BATCH, c_dim, generator=g) if c_dim else None
    return real, c, z, c


def clear_grads(*modules: torch.nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


EXPECTED_KEYS = {
    "Gmain": {"Loss/G/loss", "Loss/scores/fake", "Loss/signs/fake"},
    "Greg": {"Loss/pl_penalty", "Loss/G/reg"},
    "Dmain": {"Loss/D/loss", "Loss/scores/fake", "Loss/signs/fake"}
    | {"Loss/scores/real", "Loss/signs/real", "real_logits"},
    "Dreg": {"Loss/r1_penalty", "Loss/D/reg", "Loss/scores/real", "Loss/signs/real", "real_logits"},
}
EXPECTED_KEYS["Gboth"] = EXPECTED_KEYS["Gmain"] | EXPECTED_KEYS["Greg"]
EXPECTED_KEYS["Dboth"] = EXPECTED_KEYS["Dmain"] | EXPECTED_KEYS["Dreg"]


@pytest.mark.parametrize("phase,c_dim", [(phase, 0) for phase in PHASES] + [("Gboth", 3), ("Dboth", 3)])
def test_each_phase_writes_finite_nonzero_grads_into_the_trained_network_only(phase, c_dim):
    G, D = tiny_networks(c_dim)
    loss = StyleGAN2Loss(G, D, augment_pipe=rotate)
    stats = loss.accumulate_gradients(phase, *batch(c_dim), gain=1)

    trained, other = (G, D) if phase.startswith("G") else (D, G)
    grads = [p.grad for p in trained.parameters() if p.grad is not None]
    assert len(grads) > 0.8 * len(list(trained.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in other.parameters()), "the other network must not receive gradients"
    assert all(p.requires_grad for p in other.parameters()), "requires_grad flags must be restored"

    assert set(stats) == EXPECTED_KEYS[phase]
    for key, value in stats.items():
        assert not value.requires_grad and torch.isfinite(value).all(), key
        assert value.ndim == (2 if key == "real_logits" else 0), key


def test_signs_and_scores_of_real_logits():
    G, D = tiny_networks()
    loss = StyleGAN2Loss(G, D)
    stats = loss.accumulate_gradients("Dmain", *batch(), gain=1)
    logits = stats["real_logits"]
    assert logits.shape == (BATCH, 1)
    torch.testing.assert_close(stats["Loss/signs/real"], logits.sign().mean())
    torch.testing.assert_close(stats["Loss/scores/real"], logits.mean())
    clear_grads(D)
    with torch.no_grad():
        expected_real = D(batch()[0], None)
    torch.testing.assert_close(logits, expected_real)  # no augmentation: D's logits on the reals as given


def test_r1_through_augmentation_equals_the_formula():
    """Dreg gradients = gain * gamma/2 * d/dtheta mean_i |d D(aug(x_i)) / d x_i|^2 (the gradient before aug)."""
    G, D = tiny_networks()
    gamma, gain = 8.2, 16
    loss = StyleGAN2Loss(G, D, augment_pipe=rotate, r1_gamma=gamma)
    real, c, z, _ = batch()
    stats = loss.accumulate_gradients("Dreg", real, c, z, c, gain=gain)
    got = {name: p.grad.clone() for name, p in D.named_parameters() if p.grad is not None}

    clear_grads(D)
    x = real.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(D(rotate(x), None).sum(), x, create_graph=True)
    penalty = dx.square().sum(dim=[1, 2, 3])
    (penalty.mean() * gamma / 2 * gain).backward()
    expected = {name: p.grad for name, p in D.named_parameters() if p.grad is not None}

    assert set(expected) <= set(got)
    for name in got:
        if name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
        else:  # reached only through the reference's `real_logits * 0` term (the output bias)
            assert not got[name].any(), name
    torch.testing.assert_close(stats["Loss/r1_penalty"], penalty.detach().mean())

    # The augmentation is really on the path: without it the penalty differs.
    plain = StyleGAN2Loss(G, D, r1_gamma=gamma).accumulate_gradients("Dreg", real, c, z, c, gain=gain)
    assert not torch.allclose(plain["Loss/r1_penalty"], stats["Loss/r1_penalty"])


def test_path_length_penalty_and_pl_mean():
    G, D = tiny_networks()
    loss = StyleGAN2Loss(G, D, style_mixing_prob=0, pl_decay=0.01, pl_weight=2.0, pl_batch_shrink=2)
    assert "pl_mean" in loss.state_dict() and float(loss.pl_mean) == 0.0
    real, c, z, _ = batch()

    torch.manual_seed(5)
    stats = loss.accumulate_gradients("Greg", real, c, z, c, gain=1)

    # Recompute with the same random draws: synthesis noise, then the image-space direction y.
    torch.manual_seed(5)
    ws = G.mapping(z[: BATCH // 2], None)
    ws = ws.detach().requires_grad_(True)
    img = G.synthesis(ws)
    y = torch.randn_like(img) / math.sqrt(16 * 16)
    (jacobian_t_y,) = torch.autograd.grad((img * y).sum(), ws)
    lengths = jacobian_t_y.square().sum(2).mean(1).sqrt()
    expected_mean = 0.0 + 0.01 * lengths.mean()
    torch.testing.assert_close(loss.pl_mean, expected_mean)
    torch.testing.assert_close(stats["Loss/pl_penalty"], (lengths - expected_mean).square().mean())
    torch.testing.assert_close(stats["Loss/G/reg"], 2.0 * stats["Loss/pl_penalty"])

    # The buffer keeps moving, and survives a state-dict round trip.
    before = loss.pl_mean.clone()
    loss.accumulate_gradients("Greg", real, c, z, c, gain=1)
    assert loss.pl_mean > before
    restored = StyleGAN2Loss(G, D)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.pl_mean, loss.pl_mean)


def test_loss_state_dict_holds_only_pl_mean():
    G, D = tiny_networks()
    loss = StyleGAN2Loss(G, D, augment_pipe=torch.nn.Identity())
    assert list(loss.state_dict()) == ["pl_mean"]
    assert loss.G is G and loss.D is D
    assert "pl_mean" not in G.state_dict()


def test_style_mixing():
    G, D = tiny_networks()
    z = torch.randn(BATCH, 32)
    _, ws_plain = StyleGAN2Loss(G, D, style_mixing_prob=0).run_G(z, None)
    assert torch.equal(ws_plain, ws_plain[:, :1].expand_as(ws_plain))  # all ws equal without mixing
    _, ws_mixed = StyleGAN2Loss(G, D, style_mixing_prob=1).run_G(z, None)
    same = (ws_mixed == ws_mixed[:, :1]).all(dim=2).all(dim=0)  # [num_ws]
    cutoff = int(same.float().argmin())
    assert 1 <= cutoff < G.num_ws and same[:cutoff].all() and not same[cutoff:].any()
    torch.testing.assert_close(ws_mixed[:, 0], ws_plain[:, 0])


def test_gain_scales_gradients():
    G, D = tiny_networks()
    loss = StyleGAN2Loss(G, D)
    real, c, z, _ = batch()
    torch.manual_seed(3)
    loss.accumulate_gradients("Dboth", real, c, z, c, gain=1)
    once = [p.grad.clone() for p in D.parameters()]
    clear_grads(D)
    torch.manual_seed(3)
    loss.accumulate_gradients("Dboth", real, c, z, c, gain=4)
    for g1, g4 in zip(once, (p.grad for p in D.parameters()), strict=True):
        torch.testing.assert_close(g4, 4 * g1, rtol=1e-5, atol=1e-7)


def test_training_the_generator_lowers_its_loss_on_a_fixed_batch():
    G, D = tiny_networks()
    loss = StyleGAN2Loss(G, D, style_mixing_prob=0)
    optimizer = torch.optim.Adam(G.parameters(), lr=0.01, betas=(0.0, 0.99))
    real, c, z, _ = batch()
    values = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # same noise inputs every step
        values.append(float(loss.accumulate_gradients("Gmain", real, c, z, c, gain=1)["Loss/G/loss"]))
        optimizer.step()
    assert values[-1] < values[0] - 0.05, values


def test_unknown_phase():
    G, D = tiny_networks()
    with pytest.raises(ValueError, match="Gmain"):
        StyleGAN2Loss(G, D).accumulate_gradients("G", *batch(), gain=1)


@pytest.mark.parametrize(
    "phase,passes", [("Gmain", 1), ("Greg", 1), ("Gboth", 2), ("Dmain", 2), ("Dreg", 1), ("Dboth", 2)]
)
def test_every_backward_pass_goes_through_the_given_callable(phase, passes):
    """A LightningModule passes its manual_backward: every backward pass of a phase must reach it, and the gradients
    are those of Tensor.backward bit for bit."""
    G, D = tiny_networks()
    real, c, z, _ = batch()
    trained = G if phase.startswith("G") else D
    torch.manual_seed(5)
    StyleGAN2Loss(G, D).accumulate_gradients(phase, real, c, z, c, gain=2)
    plain = [p.grad.clone() for p in trained.parameters()]
    clear_grads(trained)
    calls = []

    def backward(loss: torch.Tensor) -> None:
        assert loss.ndim == 0
        calls.append(float(loss))
        loss.backward()

    torch.manual_seed(5)
    StyleGAN2Loss(G, D, backward=backward).accumulate_gradients(phase, real, c, z, c, gain=2)
    assert len(calls) == passes
    for g_plain, p in zip(plain, trained.parameters(), strict=True):
        assert torch.equal(p.grad, g_plain)
