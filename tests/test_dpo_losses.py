"""Maths tier for trainers/preference_losses.py: hand-derived values and direction tests.

Notation: L_* are per-sample errors, u = -(beta/2)[(L_w - L_l) - (Lref_w - Lref_l)],
-log sigmoid(x) = log(1 + e^-x). Direction tests treat the policy's outputs for a pair as free
leaf tensors (what any network's last layer receives as gradient), take one SGD step on the
loss, and check that the winner's error fell relative to the loser's and the reference's.
"""
import math

import pytest
import torch

from trainers import preference_losses as pl


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def softplus_neg(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def test_dpo_loss_hand_values():
    """model_w = (.3, .5, .4), model_l = (.5, .3, .4), ref all .4, beta = 10.
    Delta_theta = (-.2, .2, 0), Delta_ref = 0, so u = -5 Delta_theta = (1, -1, 0) and
    loss = (log(1 + e^-1), log(1 + e), log 2) = (0.31326, 1.31326, 0.69315); one of three has u > 0."""
    loss, logs = pl.dpo_loss(t(.3, .5, .4), t(.5, .3, .4), t(.4, .4, .4), t(.4, .4, .4), beta=10.0)
    torch.testing.assert_close(loss, t(softplus_neg(1), softplus_neg(-1), math.log(2)))
    assert logs["implicit_acc"].item() == pytest.approx(1 / 3)
    assert logs["model_minus_ref_w"].item() == pytest.approx((-.1 + .1 + 0) / 3)
    assert all(not v.requires_grad for v in logs.values())


def test_dpo_beta_matches_the_diffusers_sd15_convention():
    """diffusers SD1.5 writes beta' [(Lref_w - Lref_l) - (L_w - L_l)] with beta' = 2500; that is
    -(beta/2)[(L_w - L_l) - (Lref_w - Lref_l)] with beta = 2 beta' = 5000, the official default."""
    mw, ml, rw, rl = t(.101, .2), t(.1, .19), t(.1, .2), t(.1, .2)
    ours = pl.dpo_logit(mw, ml, rw, rl, beta=5000.0)
    theirs = 2500.0 * ((rw - rl) - (mw - ml))
    torch.testing.assert_close(ours, theirs)


def test_simpo_hand_values():
    """u = -(beta/2)(L_w - L_l), beta = 10: L = (.1, .3) vs (.3, .1) gives u = (1, -1)."""
    loss, logs = pl.simpo_loss(t(.1, .3), t(.3, .1), beta=10.0)
    torch.testing.assert_close(loss, t(softplus_neg(1), softplus_neg(-1)))
    assert logs["implicit_acc"].item() == 0.5 and "ref_mse_w" not in logs


def test_mapo_link_values():
    """phi(x) = x / (e^x - 1): phi(0) = 1 (limit), phi(ln 2) = ln 2 / 1, phi(1) = 1 / (e - 1)."""
    torch.testing.assert_close(pl.mapo_link(t(0.0, math.log(2), 1.0)), t(1.0, math.log(2), 1 / (math.e - 1)))


def test_mapo_loss_hand_values():
    """a = 1, T = 1, beta = 1. Pair 1: L_w = 0, L_l = ln 2: margin = phi(0) - phi(ln 2) = 1 - ln 2,
    loss = 0 + log(1 + e^-(1 - ln 2)). Pair 2 swaps them: loss = ln 2 + log(1 + e^(1 - ln 2))."""
    m = 1 - math.log(2)
    loss, _ = pl.mapo_loss(t(0.0, math.log(2)), t(math.log(2), 0.0), beta=1.0, snr_value=1.0, num_timesteps=1)
    torch.testing.assert_close(loss, t(softplus_neg(m), math.log(2) + softplus_neg(-m)))


def test_dspo_loss_hand_values():
    """Pair 1: equal errors, u = 0, 1 - sigmoid(0) = 1/2, lambda = 1: residual (1, -1) - (2, 0)/2 = (0, -1),
    mean square 1/2. Pair 2: L_w = .2, L_l = .4, refs .3, beta = 10 -> u = 1, 1 - sigmoid(1) = sigmoid(-1)
    = s; lambda = 2: (1, 1) - 2 s (1, 1) -> (1 - 2s)^2 = 0.21355. Pair 2 uses lambda 2, so run it alone."""
    loss1, _ = pl.dspo_loss(t(1.0, -1.0)[None], t(2.0, 0.0)[None], t(.3), t(.3), t(.3), t(.3), beta=10.0, weight=1.0)
    torch.testing.assert_close(loss1, t(0.5))
    s = 1 / (1 + math.e)
    loss2, logs = pl.dspo_loss(t(1.0, 1.0)[None], t(1.0, 1.0)[None], t(.2), t(.4), t(.3), t(.3), beta=10.0, weight=2.0)
    torch.testing.assert_close(loss2, t((1 - 2 * s) ** 2))
    assert logs["implicit_acc"].item() == 1.0


def test_kto_loss_hand_values():
    """model (.2, .4, .3), ref .3, labels (+1, -1, +1), beta 10: g = Lref - L = (.1, -.1, 0),
    mean g = 0 so z_0 = 0; y beta (g - z_0) = (1, 1, 0); 1 - sigmoid = (s, s, 1/2) with s = sigmoid(-1);
    lambda_desirable 2, lambda_undesirable 1 -> (2s, s, 1)."""
    model, ref, label = t(.2, .4, .3), t(.3, .3, .3), t(1, -1, 1)
    z_0 = pl.kto_reference_point((ref - model).mean())
    assert z_0.item() == pytest.approx(0.0, abs=1e-12)
    loss, logs = pl.kto_loss(model, ref, label, 10.0, z_0, lambda_desirable=2.0, lambda_undesirable=1.0)
    s = 1 / (1 + math.e)
    torch.testing.assert_close(loss, t(2 * s, s, 1.0))
    assert logs["implicit_acc"].item() == pytest.approx(2 / 3)


def test_kto_reference_point_is_clamped_and_detached():
    """z_0 = max(mean g, 0): -0.3 -> 0, 0.2 -> 0.2; no gradient flows through it."""
    x = t(0.2).requires_grad_()
    assert pl.kto_reference_point(t(-0.3)).item() == 0.0
    z = pl.kto_reference_point(x)
    assert z.item() == pytest.approx(0.2) and not z.requires_grad


def test_adaptive_metric_weight_margin_and_loss():
    """beta = 2, refs and L_l zero, so u = -L_w. Draws (K = 2) per pair: pair 1 u = (ln 3, ln 3) ->
    p = (3/4, 3/4): c = 3/4, s = 0, m = 1/4. Pair 2 u = (ln 3, -ln 3) -> p = (3/4, 1/4): c = 1/2,
    s = 1/4 (population std), m = 1/2 + 1/4 = 3/4 (kappa = 1). k_1 = 2: W = (e^-.5, e^-1.5);
    k_2 = 4, c_2 = 1/2: Gamma = (4 * 1/4, 0) = (1, 0).
    Loss 1 = e^-.5 log(1 + e^-(ln 3 - 1)) = e^-.5 log(1 + e/3);
    loss 2 = e^-1.5 * (log(4/3) + log 4) / 2."""
    ln3 = math.log(3)
    model_w = torch.tensor([[-ln3, -ln3], [-ln3, ln3]], dtype=torch.float64)  # [K, B]
    zeros = torch.zeros_like(model_w)
    u = pl.dpo_logit(model_w, zeros, zeros, zeros, beta=2.0)
    m = pl.adaptive_metric(u, stability_weight=1.0)
    torch.testing.assert_close(m, t(0.25, 0.75))
    torch.testing.assert_close(pl.adaptive_weight(m, 2.0), t(math.exp(-0.5), math.exp(-1.5)))
    torch.testing.assert_close(pl.adaptive_margin(m, 4.0, 0.5), t(1.0, 0.0))
    loss, logs = pl.adaptive_dpo_loss(model_w, zeros, zeros, zeros, 2.0, k_1=2.0, k_2=4.0, c_2=0.5,
                                      stability_weight=1.0)
    expected = t(math.exp(-0.5) * math.log(1 + math.e / 3), math.exp(-1.5) * (math.log(4 / 3) + math.log(4)) / 2)
    torch.testing.assert_close(loss, expected)
    assert logs["adaptive_margin"].item() == pytest.approx(0.5)


def test_adaptive_without_weight_or_margin_is_dpo_over_draws():
    """k_1 = k_2 = 0: W = 1, Gamma = 0, so the loss is the mean over draws of the DPO loss."""
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(3, 4, generator=g, dtype=torch.float64) for _ in range(4))
    loss, _ = pl.adaptive_dpo_loss(mw, ml, rw, rl, 10.0, k_1=0.0, k_2=0.0, c_2=0.5, stability_weight=1.0)
    dpo, _ = pl.dpo_loss(mw, ml, rw, rl, 10.0)
    torch.testing.assert_close(loss, dpo.mean(0))


def test_adaptive_downweights_a_flipped_pair():
    """A pair the policy consistently ranks the other way (a likely minority label) gets a higher
    metric and a smaller weight than one it consistently agrees with."""
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    model_w = torch.tensor([[-0.5, 0.5], [-0.4, 0.6]], dtype=torch.float64)  # pair 0 agrees, pair 1 flipped
    u = pl.dpo_logit(model_w, zeros, zeros, zeros, beta=4.0)
    m = pl.adaptive_metric(u, 1.0)
    assert m[1] > m[0]
    w = pl.adaptive_weight(m, 1.0)
    assert w[1] < w[0]


def test_flip_split_logs_by_hand():
    """K = 2 draws of B = 3 pairs, pair 1 flipped:
    u = [[1, -1, 2], [-1, -1, 3]]. Flipped column [-1, -1]: no u > 0, accuracy 0.
    Clean columns 0 and 2: [1, -1, 2, 3], three of four > 0, accuracy 0.75.
    A per-pair weight [0.2, 0.5, 0.6] averages to 0.5 on the flipped pair and (0.2 + 0.6) / 2 = 0.4 on the clean.
    A batch with no flipped pair logs only the clean group."""
    u = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, 3.0]])
    flipped = torch.tensor([False, True, False])
    logs = pl.flip_split_logs(u, flipped, {"w": torch.tensor([0.2, 0.5, 0.6])})
    assert logs["flipped/implicit_acc"] == 0.0 and logs["clean/implicit_acc"] == 0.75
    assert torch.isclose(logs["flipped/w"], torch.tensor(0.5)) and torch.isclose(logs["clean/w"], torch.tensor(0.4))
    assert set(pl.flip_split_logs(u, torch.zeros(3, dtype=torch.bool))) == {"clean/implicit_acc"}


# ------------------------------------------------------------------ direction tests

D = 16  # elements per "image"


def pair_outputs(k: int | None = None, b: int = 3, seed: int = 0):
    """Shared eps (the target for both images of a pair), reference outputs, and policy outputs as leaves."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, D) if k is None else (k, b, D)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    ref_w, ref_l = (eps + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    f_w = (ref_w + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    f_l = (ref_l + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    return eps, ref_w, ref_l, f_w, f_l


def mse(a, b):
    return (a - b).square().mean(-1)


def preference_margin(f_w, f_l, ref_w, ref_l, eps):
    """(L_w - Lref_w) - (L_l - Lref_l): negative means the winner is likelier, relative to the reference."""
    return (mse(f_w, eps) - mse(ref_w, eps)) - (mse(f_l, eps) - mse(ref_l, eps))


def sgd_step(loss, params, lr):
    grads = torch.autograd.grad(loss.sum(), params)
    with torch.no_grad():
        return [p - lr * g for p, g in zip(params, grads)]


PAIR_LOSSES = {
    "dpo": lambda fw, fl, rw, rl, e: pl.dpo_loss(mse(fw, e), mse(fl, e), mse(rw, e), mse(rl, e), 50.0)[0],
    "simpo": lambda fw, fl, rw, rl, e: pl.simpo_loss(mse(fw, e), mse(fl, e), 50.0)[0],
    "mapo": lambda fw, fl, rw, rl, e: pl.mapo_loss(mse(fw, e), mse(fl, e), 0.1, 0.5, 1000)[0],
    "dspo": lambda fw, fl, rw, rl, e: pl.dspo_loss(fw - e, fw - rw, mse(fw, e), mse(fl, e), mse(rw, e), mse(rl, e),
                                                   50.0, 0.5)[0],
}


@pytest.mark.parametrize("name", ["dpo", "simpo", "mapo", "dspo"])
def test_a_descent_step_raises_the_winner_relative_to_the_reference(name):
    eps, ref_w, ref_l, f_w, f_l = pair_outputs()
    before = preference_margin(f_w, f_l, ref_w, ref_l, eps)
    new_w, new_l = sgd_step(PAIR_LOSSES[name](f_w, f_l, ref_w, ref_l, eps), [f_w, f_l], lr=1e-3)
    after = preference_margin(new_w, new_l, ref_w, ref_l, eps)
    assert (after < before).all(), f"{name}: margin went from {before.tolist()} to {after.tolist()}"


def test_direction_check_catches_the_reversed_orpo_sign():
    """The check above can fail: the preference term of Diffusion-ORPO as read in diffusers,
    -log sigmoid(+(L_w - L_l)) (here simpo with beta < 0), makes the winner less likely."""
    eps, ref_w, ref_l, f_w, f_l = pair_outputs()
    loss, _ = pl.simpo_loss(mse(f_w, eps), mse(f_l, eps), beta=-50.0)
    before = preference_margin(f_w, f_l, ref_w, ref_l, eps)
    new_w, new_l = sgd_step(loss, [f_w, f_l], lr=1e-3)
    assert (preference_margin(new_w, new_l, ref_w, ref_l, eps) > before).all()


def test_adaptive_descent_step_raises_the_winner():
    eps, ref_w, ref_l, f_w, f_l = pair_outputs(k=2)
    before = preference_margin(f_w, f_l, ref_w, ref_l, eps).mean(0)
    loss, _ = pl.adaptive_dpo_loss(mse(f_w, eps), mse(f_l, eps), mse(ref_w, eps), mse(ref_l, eps), 50.0,
                                   k_1=1.0, k_2=2.0, c_2=0.5, stability_weight=1.0)
    new_w, new_l = sgd_step(loss, [f_w, f_l], lr=1e-3)
    assert (preference_margin(new_w, new_l, ref_w, ref_l, eps).mean(0) < before).all()


def test_kto_descent_step_raises_desirable_and_lowers_undesirable():
    """Desirable images: L - Lref falls; undesirable: it rises."""
    eps, ref, _, f, _ = pair_outputs(b=4)
    label = t(1, -1, 1, -1)
    model_err, ref_err = mse(f, eps), mse(ref, eps)
    z_0 = pl.kto_reference_point((ref_err - model_err).mean())
    loss, _ = pl.kto_loss(model_err, ref_err, label, 50.0, z_0)
    (new,) = sgd_step(loss, [f], lr=1e-3)
    change = (mse(new, eps) - ref_err) - (model_err.detach() - ref_err)
    assert (change[label > 0] < 0).all() and (change[label < 0] > 0).all()


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_a_descent_step_on_the_pixel_term_raises_the_winner_in_pixel_space(name):
    """dpo.pixel: the same pair loss on P(e) = mean ||D(a z_0 + s e) - D(a z_0 + s eps)||^2 (trainers/losses/
    pixel.py), winner and loser with their own z_0 and the shared eps, t. One descent step on the policy's
    eps predictions must lower the pixel-space margin (P(f_w) - P(ref_w)) - (P(f_l) - P(ref_l))."""
    from test_losses_pixel import tiny_vae

    from trainers.losses.pixel import pixel_noise_loss

    torch.manual_seed(0)
    vae = tiny_vae()
    g = torch.Generator().manual_seed(1)
    z_w, z_l, eps = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    ref_w, ref_l = (eps + 0.5 * torch.randn(3, 4, 4, 4, generator=g) for _ in range(2))
    f_w = (ref_w + 0.1 * torch.randn(3, 4, 4, 4, generator=g)).requires_grad_()
    f_l = (ref_l + 0.1 * torch.randn(3, 4, 4, 4, generator=g)).requires_grad_()
    alpha, sigma = torch.full((3,), 0.8), torch.full((3,), 0.6)

    def pixel(z_0, e_hat):
        return pixel_noise_loss(vae, z_0, eps, e_hat, alpha, sigma)[0]

    def margin(fw, fl):
        return (pixel(z_w, fw) - pixel(z_w, ref_w)) - (pixel(z_l, fl) - pixel(z_l, ref_l))

    if name == "dpo":
        loss = pl.dpo_loss(pixel(z_w, f_w), pixel(z_l, f_l), pixel(z_w, ref_w), pixel(z_l, ref_l), 50.0)[0]
    else:
        loss = pl.simpo_loss(pixel(z_w, f_w), pixel(z_l, f_l), 50.0)[0]
    before = margin(f_w, f_l).detach()
    new_w, new_l = sgd_step(loss, [f_w, f_l], lr=1e-2)
    after = margin(new_w, new_l).detach()
    assert (after < before).all(), f"{name}: pixel margin went from {before.tolist()} to {after.tolist()}"
