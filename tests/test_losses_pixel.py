"""Pixel-space loss: a VAE whose decoder is a known linear map, and gradients through a tiny real VAE."""
import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL

from trainers.losses.pixel import PixelLossConfig, decode_scaled, latent_scale, pixel_loss, pixel_noise_loss


def tiny_vae(**kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16, **kwargs)
    return vae.requires_grad_(False).eval()


def linear_vae() -> AutoencoderKL:
    """AutoencoderKL (scale 0.5, no post_quant_conv) whose decoder is the 1x1 conv W = [e_0; e_1; 0]."""
    vae = tiny_vae(scaling_factor=0.5, use_post_quant_conv=False)
    conv = torch.nn.Conv2d(4, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = 1.0
    vae.decoder = conv.requires_grad_(False)
    return vae


def inputs():
    """Two samples, 4 latent channels, 2x2; eps - eps_hat = d = (1, 2, 3, 4) per channel."""
    z_0 = torch.randn(2, 4, 2, 2)
    eps = torch.randn(2, 4, 2, 2)
    d = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)
    return z_0, eps, eps - d


def test_noisy_latent_loss_on_a_linear_decoder():
    """D(z) = W (z / 0.5) = 2 W z, so D(x_t) - D(x_t_hat) = 2 sigma W (eps - eps_hat) = 2 sigma (1, 2, 0).

    Per pixel the squared error is 4 sigma^2 (1 + 4 + 0) = 20 sigma^2; mean over C=3 -> 20 sigma^2 / 3,
    independent of alpha. sigma = (0.5, 1): (5/3, 20/3).
    """
    z_0, eps, eps_hat = inputs()
    alpha, sigma = torch.tensor([0.8, 0.5]), torch.tensor([0.5, 1.0])
    loss, logs = pixel_loss(linear_vae(), z_0, eps, eps_hat, alpha, sigma, PixelLossConfig())
    assert torch.allclose(loss, torch.tensor([5 / 3, 20 / 3]))
    assert logs["pixel/mse"].item() == pytest.approx(25 / 6)


def test_x0_variant_on_a_linear_decoder():
    """z_0_hat - z_0 = (sigma/alpha)(eps - eps_hat), so the loss is 20 sigma^2 / (3 alpha^2).

    (alpha, sigma) = (0.8, 0.5): 5 / (3 * 0.64) = 2.6041667; (0.5, 1): 80/3.
    """
    z_0, eps, eps_hat = inputs()
    alpha, sigma = torch.tensor([0.8, 0.5]), torch.tensor([0.5, 1.0])
    loss, _ = pixel_loss(linear_vae(), z_0, eps, eps_hat, alpha, sigma, PixelLossConfig(target="x0"))
    assert torch.allclose(loss, torch.tensor([5 / 1.92, 80 / 3]))


def test_decode_scaled_uses_scale_and_shift():
    """Bare decoder (identity) with scale 2 and shift 1: z = 4 decodes to 4/2 + 1 = 3."""
    out = decode_scaled(torch.nn.Identity(), torch.full((1, 1, 1, 1), 4.0), scaling_factor=2.0, shift_factor=1.0)
    assert out.item() == 3.0
    with pytest.raises(ValueError, match="scaling_factor"):
        latent_scale(torch.nn.Identity())
    assert latent_scale(tiny_vae()) == (0.18215, 0.0)


def test_gradient_reaches_eps_hat_only_and_vanishes_at_the_truth():
    vae = tiny_vae()
    z_0 = torch.randn(2, 4, 4, 4)
    eps = torch.randn_like(z_0).requires_grad_()
    alpha, sigma = torch.tensor([0.9, 0.6]), torch.tensor([0.436, 0.8])
    eps_hat = eps.detach().clone().requires_grad_()
    loss, _ = pixel_noise_loss(vae, z_0, eps, eps_hat, alpha, sigma)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(2)) and eps_hat.grad.abs().max() == 0
    eps_hat = (eps.detach() + 0.5 * torch.randn_like(z_0)).requires_grad_()
    loss, _ = pixel_noise_loss(vae, z_0, eps, eps_hat, alpha, sigma)
    loss.sum().backward()
    assert (loss > 0).all() and eps_hat.grad.abs().sum() > 0
    assert eps.grad is None  # the target decode runs without gradient
    assert all(p.grad is None for p in vae.parameters())


def test_config_validation_and_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(PixelLossConfig))
    with pytest.raises(ValueError, match="'latent'"):
        PixelLossConfig(target="latent")
