"""Maths tier for trainers/fdivergence.py: h(r) = f''(r) r^2 per divergence, ratio clamping, time bins,
the per-bin ratio EMA and mean normalisation (including its cross-process sum)."""
import math

import pytest
import torch

from trainers.fdivergence import (DIVERGENCES, RatioOptions, bin_means, density_ratio, fdivergence_weights,
                                  h_weight, mean_normalise, time_bins, update_ratio_ema)

R = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
S2 = math.sqrt(2.0)

# h(r) at r = 0.5, 1, 2, derived by hand (f, f', f'' below; h = f'' r^2):
HAND = {
    # f = -log r; f' = -1/r; f'' = 1/r^2 -> h = 1
    "rkl": [1.0, 1.0, 1.0],
    # f = (r+1) log((r+1)/(2r)); f' = log((r+1)/(2r)) - 1/r; f'' = 1/(r+1) - 1/r + 1/r^2 = 1/(r^2 (r+1))
    # -> h = 1/(r+1): 1/1.5, 1/2, 1/3
    "srkl": [2.0 / 3.0, 0.5, 1.0 / 3.0],
    # f = r log r - (r+1) log((r+1)/2); f' = log r - log((r+1)/2); f'' = 1/r - 1/(r+1) = 1/(r(r+1))
    # -> h = r/(r+1): 0.5/1.5, 1/2, 2/3
    "js": [1.0 / 3.0, 0.5, 2.0 / 3.0],
    # f = 1 - sqrt r; f' = -1/(2 sqrt r); f'' = 1/(4 r^1.5) -> h = sqrt(r)/4: sqrt(.5)/4, 1/4, sqrt(2)/4
    "hellinger": [1.0 / (4.0 * S2), 0.25, S2 / 4.0],
    # f = r log r; f' = log r + 1; f'' = 1/r -> h = r
    "fkl": [0.5, 1.0, 2.0],
    # f = (r-1) log r; f' = log r + 1 - 1/r; f'' = 1/r + 1/r^2 -> h = r + 1
    "jeffreys": [1.5, 2.0, 3.0],
    # f = (1-r)^2 / r = 1/r - 2 + r; f'' = 2/r^3 -> h = 2/r
    "neyman": [4.0, 2.0, 1.0],
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_h_matches_hand_values(name):
    torch.testing.assert_close(h_weight(name, R), torch.tensor(HAND[name], dtype=torch.float64))


@pytest.mark.parametrize("alpha, expected", [(2.0, [0.25, 1.0, 4.0]), (-1.0, [2.0, 1.0, 0.5]),
                                             (0.5, [1.0 / S2, 1.0, S2])])
def test_alpha_divergence_h_is_r_to_the_alpha(alpha, expected):
    """f = (r^a - a r - (1 - a)) / (a (a - 1)); f'' = a (a - 1) r^(a-2) / (a (a - 1)) = r^(a-2) -> h = r^a."""
    torch.testing.assert_close(h_weight("alpha", R, alpha), torch.tensor(expected, dtype=torch.float64))


def _second_derivative(f, r: torch.Tensor) -> torch.Tensor:
    r = r.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    return d2


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_every_table_row_has_h_equal_f_second_derivative_times_r_squared(name):
    """Autograd check of the closed forms on a spread of r (float64), and f(1) = 0 (a valid f-divergence)."""
    alpha = 0.3
    div = DIVERGENCES[name]
    r = torch.tensor([0.1, 0.5, 0.9, 1.0, 1.7, 2.0, 7.5], dtype=torch.float64)
    expected = _second_derivative(lambda x: div.f(x, alpha), r) * r ** 2
    torch.testing.assert_close(div.h(r, alpha), expected, rtol=1e-10, atol=1e-12)
    assert abs(float(div.f(torch.tensor(1.0, dtype=torch.float64), alpha))) < 1e-12


def test_unknown_divergence_and_degenerate_alpha_are_rejected():
    with pytest.raises(ValueError, match="unknown f-divergence 'kl'"):
        h_weight("kl", R)
    with pytest.raises(ValueError, match="alpha not in"):
        h_weight("alpha", R, 1.0)


def test_density_ratio_clamps_logit_then_ratio():
    """r = clip(exp(clip(l, -10, 10)), 0.1, 20):
    l = 0 -> 1; l = log 3 -> 3; l = -5 -> e^-5 = 0.0067 -> 0.1; l = 50 -> e^10 -> 20; l = log 0.2 -> 0.2.
    With logit clamp 1: l = 50 -> e^1 = 2.718 (< 20, so the logit clamp is what binds)."""
    logits = torch.tensor([0.0, math.log(3.0), -5.0, 50.0, math.log(0.2)])
    torch.testing.assert_close(density_ratio(logits), torch.tensor([1.0, 3.0, 0.1, 20.0, 0.2]))
    assert float(density_ratio(torch.tensor([50.0]), logit_clamp=1.0)) == pytest.approx(math.e, rel=1e-6)


def test_time_bins_cover_the_range():
    """10 bins of [0, 999]: t = 0 -> 0, 99.8 -> 0 (0.999), 99.9 -> 1 (1.0), 500 -> 5, 999 -> 9 (end in the last)."""
    t = torch.tensor([0.0, 99.8, 99.9, 500.0, 999.0])
    assert time_bins(t, 999.0, 10).tolist() == [0, 0, 1, 5, 9]


def test_bin_means_and_ema_update():
    """r = [1, 3, 4] in bins [0, 0, 2] of 3: means = [2, (absent -> 1), 4].
    EMA rate 0.5 from [1, 1, 1]: bin 0 -> 0.5 + 0.5 * 2 = 1.5, bin 1 untouched = 1, bin 2 -> 0.5 + 2 = 2.5.
    Rate 0 gives this batch's means where present."""
    r = torch.tensor([1.0, 3.0, 4.0])
    bins = torch.tensor([0, 0, 2])
    means, present = bin_means(r, bins, 3)
    assert means.tolist() == [2.0, 1.0, 4.0] and present.tolist() == [True, False, True]
    ema = torch.ones(3)
    assert update_ratio_ema(ema, means, present, 0.5).tolist() == [1.5, 1.0, 2.5]
    assert update_ratio_ema(ema, means, present, 0.0).tolist() == [2.0, 1.0, 4.0]


def test_mean_normalise_local_and_across_processes():
    """h = [1, 3] -> mean 2 -> [0.5, 1.5]. With a second process holding [5, 7] (faked by an all_sum that adds
    the other rank's [sum 12, count 2]), the global mean is 16/4 = 4 -> [0.25, 0.75]."""
    h = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(mean_normalise(h), torch.tensor([0.5, 1.5]))
    other = torch.tensor([12.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(mean_normalise(h, lambda s: s + other), torch.tensor([0.25, 0.75]))


def test_weights_pipeline_on_hand_values():
    """Forward KL, 2 bins of [0, 1000], rate 0. logits log[1, 3, 2, 2] at t = [100, 200, 800, 900]:
    r = [1, 3, 2, 2]; bin means [2, 2] -> r_norm = [0.5, 1.5, 1, 1]; h = r_norm; mean 1 -> w = [0.5, 1.5, 1, 1].
    Jensen-Shannon on the same: h = r/(r+1) = [1/3, 0.6, 0.5, 0.5], mean 0.48333 -> w = h / 0.48333.
    No bin normalisation, logits doubled: r = [1, 9, 4, 4], h = r, mean 4.5 -> w = r / 4.5."""
    logits = torch.log(torch.tensor([1.0, 3.0, 2.0, 2.0]))
    t = torch.tensor([100.0, 200.0, 800.0, 900.0])
    w, ema, _ = fdivergence_weights(logits, t, 1000.0, torch.ones(2), RatioOptions("fkl", num_bins=2))
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5, 1.0, 1.0]))
    torch.testing.assert_close(ema, torch.tensor([2.0, 2.0]))
    w, _, _ = fdivergence_weights(logits, t, 1000.0, torch.ones(2), RatioOptions("js", num_bins=2))
    h = torch.tensor([1 / 3, 0.6, 0.5, 0.5])
    torch.testing.assert_close(w, h / h.mean())
    assert float(w.mean()) == pytest.approx(1.0)
    # without bin normalisation the ratio is used as clipped and the EMA is left untouched
    w, ema, _ = fdivergence_weights(logits * 2, t, 1000.0, torch.ones(2), RatioOptions("fkl", num_bins=2,
                                                                                      normalise_bins=False))
    torch.testing.assert_close(w, torch.tensor([1.0, 9.0, 4.0, 4.0]) / 4.5)
    torch.testing.assert_close(ema, torch.ones(2))


def test_reverse_kl_weights_are_all_one():
    """h = 1 for reverse KL whatever the ratio: f-distill reduces to DMD."""
    w, _, _ = fdivergence_weights(torch.randn(5, generator=torch.Generator().manual_seed(0)), torch.rand(5) * 999,
                                  999.0, torch.ones(10), RatioOptions("rkl"))
    torch.testing.assert_close(w, torch.ones(5))
