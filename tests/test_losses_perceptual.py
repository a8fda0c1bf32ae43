"""Latent Perceptual Loss: hand-derived values on tiny tensors, and gradients through a tiny real VAE."""
import dataclasses
import math

import pytest
import torch
from diffusers import AutoencoderKL

from trainers.losses.perceptual import (
    LPLConfig, decoder_features, latent_perceptual_loss, layer_weight, lpl_gate, masked_mse, normalize_features,
    outlier_mask,
)


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16)
    return vae.requires_grad_(False).eval()


class Block(torch.nn.Module):
    """Stands in for a decoder block: x -> factor * x, with the (sample, temb) call signature."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x, temb=None):
        return self.factor * x


class LinearDecoder(torch.nn.Module):
    """conv_in = identity, mid = identity, up_0 = x2, up_1 = x2: features u, 2u, 4u."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Identity()
        self.mid_block = Block(1.0)
        self.up_blocks = torch.nn.ModuleList([Block(2.0), Block(2.0)])


def test_normalize_features_on_two_channel_one_by_two_maps():
    """Target y: pixel 0 = (3, 4), pixel 1 = (0, 1); norms 5 and 1. Prediction x: (6, 8) and (1, 0); norms 10, 1.

    shared: y/|y| = (.6,.8),(0,1); x/|y| = (1.2,1.6),(1,0). Squared errors: .36+.64 = 1 and 1+1 = 2,
            mean over 2 channels x 2 pixels = 3/4.
    self:   x/|x| = (.6,.8),(1,0); errors 0 and 2 -> 2/4 = 1/2.
    none:   errors (6-3)^2+(8-4)^2 = 25 and 1+1 = 2 -> 27/4.
    """
    y = torch.tensor([[3.0, 0.0], [4.0, 1.0]]).reshape(1, 2, 1, 2)
    x = torch.tensor([[6.0, 1.0], [8.0, 0.0]]).reshape(1, 2, 1, 2)
    xs, ys = normalize_features(x, y, "shared", eps=0.0)
    assert torch.allclose(ys.flatten(), torch.tensor([0.6, 0.0, 0.8, 1.0]))
    assert torch.allclose(xs.flatten(), torch.tensor([1.2, 1.0, 1.6, 0.0]))
    for mode, expected in (("shared", 0.75), ("self", 0.5), ("none", 6.75)):
        assert masked_mse(*normalize_features(x, y, mode, eps=0.0)).item() == pytest.approx(expected)


def test_masked_mse_averages_over_valid_positions_only():
    """Sample 0: errors 1,4,9,16 with mask 1,0,1,0 -> (1+9)/2 = 5. Sample 1: fully masked -> 0, not NaN."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask = torch.tensor([[[[1, 0], [1, 0]]], [[[0, 0], [0, 0]]]], dtype=torch.bool)
    assert masked_mse(x, torch.zeros_like(x), mask).tolist() == [5.0, 0.0]
    assert masked_mse(x, torch.zeros_like(x)).tolist() == [7.5, 7.5]


def single_outlier(size: int = 10, value: float = 100.0) -> torch.Tensor:
    y = torch.zeros(1, 1, size, size)
    y[0, 0, 5, 5] = value
    return y


def test_outlier_bounds_on_a_single_spike():
    """10x10 zeros with one 100 at (5,5); N = 100.

    Nearest-rank quantiles: k_lo = round(.02*99)+1 = 3, k_hi = round(.98*99)+1 = 98 -> both 0.
    Population std = sqrt(E[y^2] - E[y]^2) = sqrt(100 - 1) = 9.95, margin 2*9.95 = 19.9,
    so only the spike lies outside [-19.9, 19.9].
    Without dilation and a 3x3 erosion the hole grows to the 3x3 block around (5,5): 9 masked.
    With the default 3x3 dilation the 1-pixel hole is filled first, and the 5x5 erosion of an
    all-ones mask changes nothing: a lone spike is kept (the mask targets outlier regions).
    """
    raw = outlier_mask(single_outlier(), dilate=1, erode=1)
    assert (~raw).sum() == 1 and not raw[0, 0, 5, 5]
    half = outlier_mask(single_outlier(), dilate=1, erode=3)
    expected = torch.ones(10, 10, dtype=torch.bool)
    expected[4:7, 4:7] = False
    assert torch.equal(half[0, 0], expected)
    assert outlier_mask(single_outlier()).all()


def test_outlier_mask_on_a_three_by_three_blob():
    """30x30 zeros with a 3x3 blob of v = 100 at rows/cols 10..12; N = 900.

    Quantiles: k_hi = round(.98*899)+1 = 882 <= 891 zeros, so q_lo = q_hi = 0.
    std = sqrt(9 v^2/900 - (9v/900)^2) = v sqrt(.0099) = 0.0995 v; margin 0.199 v < v: the blob is out.
    3x3 dilation shrinks the 3x3 hole to its centre (11,11); 5x5 erosion grows that back to
    rows/cols 9..13: 25 masked positions.
    """
    y = torch.zeros(2, 1, 30, 30)
    y[:, :, 10:13, 10:13] = 100.0
    mask = outlier_mask(y)
    expected = torch.ones(30, 30, dtype=torch.bool)
    expected[9:14, 9:14] = False
    assert torch.equal(mask[0, 0], expected) and torch.equal(mask[1, 0], expected)


def test_outlier_mask_keeps_a_constant_channel():
    """std = 0 and q_lo = q_hi = c: with inclusive bounds every value c is kept."""
    assert outlier_mask(torch.full((1, 2, 8, 8), 3.0)).all()


def test_layer_weights_power_law():
    """2^-min(i,3): 1, 1/2, 1/4, 1/8, 1/8; all 1 without the power law."""
    assert [layer_weight(i) for i in range(5)] == [1.0, 0.5, 0.25, 0.125, 0.125]
    assert [layer_weight(i, power_law=False) for i in range(5)] == [1.0] * 5


def lpl_on_linear_decoder(z_0_hat, z_0, **overrides):
    cfg = LPLConfig(num_blocks=1, outlier_mask=False, gate="none", eps=0.0, **overrides)
    return latent_perceptual_loss(LinearDecoder(), z_0_hat, z_0, cfg, scaling_factor=0.5, shift_factor=1.0)


def test_lpl_total_on_a_linear_decoder_without_normalisation():
    """Features u = z/0.5 + 1 (layer 0) and 2u (layer 1). z_0 = 0, z_0_hat = 0.5: u = 1 vs 2.

    Layer 0 MSE = (2-1)^2 = 1; layer 1 MSE = (4-2)^2 = 4.
    Total = (w_0 * 1 + w_1 * 4) / 2 layers = (1 + 0.5*4)/2 = 1.5.
    """
    z_0 = torch.zeros(2, 2, 3, 3)
    loss, logs = lpl_on_linear_decoder(torch.full_like(z_0, 0.5), z_0, norm="none")
    assert torch.allclose(loss, torch.tensor([1.5, 1.5]))
    assert logs["lpl/layer0"].item() == pytest.approx(1.0) and logs["lpl/layer1"].item() == pytest.approx(4.0)


def test_lpl_total_on_a_linear_decoder_with_shared_normalisation():
    """Same set-up, 2 channels. Layer 0: y = (1,1), |y| = sqrt2; x = (2,2).

    x/|y| - y/|y| = (2-1)/sqrt2 per channel -> squared 1/2. Layer 1 scales x and y by 2,
    which the shared norm divides out: again 1/2. Total = (1*.5 + .5*.5)/2 = 0.375.
    """
    z_0 = torch.zeros(1, 2, 3, 3)
    loss, _ = lpl_on_linear_decoder(torch.full_like(z_0, 0.5), z_0, norm="shared")
    assert loss.item() == pytest.approx(0.375)


def test_gate_by_t_and_by_snr():
    """t gate: t < 200 keeps t=10 and drops t=500; snr gate: SNR > 3 keeps 10 and drops 1."""
    cfg_t, cfg_snr = LPLConfig(gate="t", max_t=200.0), LPLConfig(gate="snr", min_snr=3.0)
    assert lpl_gate(cfg_t, 2, t=torch.tensor([10.0, 500.0])).tolist() == [True, False]
    assert lpl_gate(cfg_snr, 2, snr=torch.tensor([10.0, 1.0])).tolist() == [True, False]
    with pytest.raises(ValueError, match="needs the snr argument"):
        lpl_gate(cfg_snr, 2, t=torch.tensor([10.0, 500.0]))
    z_0 = torch.zeros(2, 2, 3, 3)
    cfg = LPLConfig(num_blocks=1, outlier_mask=False, norm="none", gate="t", eps=0.0)
    loss, logs = latent_perceptual_loss(LinearDecoder(), torch.full_like(z_0, 0.5), z_0, cfg,
                                        t=torch.tensor([10.0, 500.0]), scaling_factor=0.5, shift_factor=1.0)
    assert loss.tolist() == [1.5, 0.0] and logs["lpl/gate_frac"].item() == 0.5


def test_decoder_features_chain_into_the_real_decode():
    """Features 0..2 of the tiny VAE, finished with the decoder's output head, equal vae.decode."""
    vae = tiny_vae()
    z = torch.randn(2, 4, 4, 4)
    feats = decoder_features(vae, z, num_blocks=4)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 4, 4), (2, 16, 8, 8), (2, 8, 8, 8)]
    d = vae.decoder
    with torch.no_grad():
        image = d.conv_out(d.conv_act(d.conv_norm_out(feats[-1])))
        assert torch.allclose(image, vae.decode(z).sample, atol=1e-5)


def test_lpl_gradient_flows_to_prediction_and_vanishes_at_the_target():
    vae = tiny_vae()
    cfg = LPLConfig(gate="t", max_t=200.0)
    z_0 = torch.randn(3, 4, 4, 4)
    t = torch.tensor([10.0, 50.0, 900.0])
    same = z_0.clone().requires_grad_()
    loss, _ = latent_perceptual_loss(vae, same, z_0, cfg, t=t)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(3)) and same.grad.abs().max() == 0
    z_0_hat = (z_0 + 0.3 * torch.randn_like(z_0)).requires_grad_()
    loss, logs = latent_perceptual_loss(vae, z_0_hat, z_0, cfg, t=t)
    loss.sum().backward()
    assert (loss[:2] > 0).all() and loss[2] == 0
    assert z_0_hat.grad[:2].abs().sum() > 0 and z_0_hat.grad[2].abs().sum() == 0  # gated out: no gradient
    assert all(p.grad is None for p in vae.parameters())
    assert all(not v.requires_grad and math.isfinite(v.item()) for v in logs.values())

    checkpointed = z_0_hat.detach().clone().requires_grad_()
    loss_ckpt, _ = latent_perceptual_loss(vae, checkpointed, z_0, dataclasses.replace(cfg, gradient_checkpointing=True),
                                          t=t)
    loss_ckpt.sum().backward()
    assert torch.allclose(loss_ckpt, loss) and torch.allclose(checkpointed.grad, z_0_hat.grad, atol=1e-6)


def test_config_validation_and_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(LPLConfig))
    with pytest.raises(ValueError, match="norm='cross'"):
        LPLConfig(norm="cross")
    with pytest.raises(ValueError, match="num_blocks"):
        LPLConfig(num_blocks=5)
