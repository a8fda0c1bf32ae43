"""The toy attribute net (pipelines/toy/attribute_net.py) and its reward toy_attribute_net, with the shipped weights."""
import math

import numpy as np
import pytest
import torch

from pipelines.toy import TOY_ATTRIBUTES
from pipelines.toy.attribute_net import (AttributeLogits, caption_log_likelihood, decode, load_attribute_net,
                                         save_attribute_net, scene_targets)
from pipelines.toy.attribute_training import CHANGES, accuracy_report, ranking_report, render_batch
from pipelines.toy.world import BACKGROUND_COLOURS, ObjectSpec, SceneSpec, caption, parse_caption, place, render
from rewards import build_reward


@pytest.fixture(scope="module")
def reward():
    torch.manual_seed(0)
    return build_reward("toy_attribute_net")


def _renders(split: str, n: int):
    """Fresh renders: a seed that neither the build's training (seed 0) nor its report (seed 1) draws from."""
    return render_batch(np.random.default_rng([2024, split == "heldout"]), n, split)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_net_decodes_fresh_renders_exactly(split):
    """Held-out renders carry (colour, shape) pairs the net never saw; a net that binds colour to shape, or a
    random one (exact ~ 0), fails the 0.9 bar. The shipped net measured 1.000 on both splits."""
    images, specs = _renders(split, 300)
    report = accuracy_report(load_attribute_net(TOY_ATTRIBUTES), images, specs)
    assert report["exact"] >= 0.9, report


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_reward_ranks_the_true_caption_above_one_attribute_off(reward, split):
    """For each kind of change (an object's colour, shape, size or position, or the background), the true
    caption must score higher than the changed one on at least 90% of renders (measured: 1.000 each)."""
    images, specs = _renders(split, 150)
    report = ranking_report(reward, images, specs, seed=5)
    assert set(report) == set(CHANGES)
    assert min(report.values()) >= 0.9, report


def test_gradients_reach_the_images_and_pixel_ascent_changes_the_shape(reward):
    """A large red square asked to be a circle: the reward's gradient is finite and non-zero on the pixels, and
    20 Adam steps on the pixels raise the reward and turn the net's argmax shape at that cell to circle."""
    spec = SceneSpec((ObjectSpec("large", "red", "square", "center"),), "blue")
    image = torch.from_numpy(render(place(spec, np.random.default_rng(0)))).permute(2, 0, 1)[None].float() / 127.5 - 1
    asked = [caption(SceneSpec((ObjectSpec("large", "red", "circle", "center"),), "blue"))]
    x = image.clone().requires_grad_(True)
    before = reward(x, asked)
    (grad,) = torch.autograd.grad(before.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    optimizer = torch.optim.Adam([x], lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        (-reward(x, asked)).sum().backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    with torch.no_grad():
        after, logits = reward(x, asked), reward.net(x)
    assert float(after) > float(before.detach()) + 5.0, (float(before.detach()), float(after))
    assert decode(logits)[0].objects[0].shape == "circle"


def test_caption_log_likelihood_by_hand():
    """One object, "a large red circle at the center on a blue background", and hand-made logits:

    background: all 9 logits 0, so log p(blue) = -ln 9;
    occupied: every cell [0, 0], so each of the 9 cells adds -ln 2 (occupied at the centre, empty elsewhere);
    colour at the centre: ln 3 for red, 0 for the 5 others: p = 3 / (3 + 5) = 3/8;
    shape at the centre: all 0: p(circle) = 1/3;
    size at the centre: [0, ln 3] (small, large): p(large) = 3/4.
    Total: -ln 9 - 9 ln 2 + ln(3/8) - ln 3 + ln(3/4) = -ln 9 - 9 ln 2 + ln(3/32) = -2.1972 - 6.2383 - 2.3671 = -10.8027.
    The colour, shape and size logits of the 8 empty cells are random and must not count.
    """
    g = torch.Generator().manual_seed(0)
    logits = AttributeLogits(torch.zeros(1, 9), torch.zeros(1, 9, 2), torch.randn(1, 9, 6, generator=g) * 5,
                             torch.randn(1, 9, 3, generator=g) * 5, torch.randn(1, 9, 2, generator=g) * 5)
    logits.colour[0, 4] = torch.tensor([math.log(3), 0, 0, 0, 0, 0])
    logits.shape[0, 4] = 0.0
    logits.size[0, 4] = torch.tensor([0.0, math.log(3)])
    targets = scene_targets([parse_caption("a large red circle at the center on a blue background")])
    expected = -math.log(9) - 9 * math.log(2) + math.log(3 / 32)
    assert float(caption_log_likelihood(logits, targets)) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(-10.8027, abs=1e-4)


def test_decode_inverts_scene_targets():
    """Logits that put +10 on every target class (and on "empty" for empty cells) decode to the caption's scene."""
    specs = [s.spec for s in (place(parse_caption(c), np.random.default_rng(0)) for c in (
        "a small green square at the left and a large purple triangle at the right on a white background",
        "a large orange circle at the bottom right on a black background"))]
    t = scene_targets(specs)
    one_hot = lambda target, n: torch.nn.functional.one_hot(target.clamp(min=0), n).float() * 10  # noqa: E731
    logits = AttributeLogits(one_hot(t.background, len(BACKGROUND_COLOURS)), one_hot(t.occupied, 2),
                             one_hot(t.colour, 6), one_hot(t.shape, 3), one_hot(t.size, 2))
    assert decode(logits) == specs


def test_bad_caption_is_a_one_line_value_error_naming_it(reward):
    images = torch.zeros(2, 3, 32, 32)
    good = "a small red circle at the top on a blue background"
    with pytest.raises(ValueError, match="toy_attribute_net.*'a red cat'") as err:
        reward(images, [good, "a red cat"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="a small pink circle"):
        reward(images, [good, "a small pink circle at the top on a blue background"])


def test_frozen_differentiable_any_size_and_save_load_round_trip(reward, tmp_path):
    """Frozen and flagged differentiable (also to rg_lcd's config check, which loads no weights); a 64x64 image
    is resized to 32 inside the net; a saved copy gives the same scores."""
    from rewards.toy import ToyAttributeNet
    from trainers.rg_lcd import reward_differentiable

    assert reward_differentiable("toy_attribute_net", {}, "test") is True
    assert isinstance(reward, ToyAttributeNet) and reward.differentiable and not reward.training
    assert not any(p.requires_grad for p in reward.parameters())
    images, specs = _renders("train", 4)
    captions = [caption(s) for s in specs]
    scores = reward(images, captions)
    assert scores.dtype == torch.float32 and scores.shape == (4,) and (scores <= 0).all()
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert torch.allclose(reward(big, captions), scores, atol=0.05)
    save_attribute_net(reward.net, tmp_path / "copy")
    copy = build_reward("toy_attribute_net", path=tmp_path / "copy")
    assert torch.equal(copy(images, captions), scores)
