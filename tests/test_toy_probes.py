"""The toy probes: their counting checked on pipelines whose answer is known, and the gain table on the teacher."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.toy.probes import CHANGED, failures, position_response
from pipelines.toy.world import parse_caption, place, render


class RenderingPipe:
    """Draws each prompt's scene exactly (a perfect model), or with every object moved to `fixed` (a model
    that takes the layout from the noise alone and so lands in one cell whatever the words say)."""

    device = "cpu"

    def __init__(self, fixed: str | None = None):
        self.fixed = fixed

    def __call__(self, prompts, latents=None, **kwargs):
        rng = np.random.default_rng(0)
        images = []
        for prompt in prompts:
            spec = parse_caption(prompt)
            if self.fixed:
                spec = dataclasses.replace(spec, objects=tuple(dataclasses.replace(o, position=self.fixed)
                                                               for o in spec.objects))
            images.append(render(place(spec, rng)) / 255.0)
        return SimpleNamespace(images=np.stack(images))


def test_position_response_of_a_model_that_follows_the_words():
    """Every object drawn where asked: found 1, right cell 1, nine distinct cells per noise."""
    r = position_response(RenderingPipe(), (1, 4, 16, 16), noises=2)
    assert (r.found, r.right_cell, r.distinct_cells) == (1.0, 1.0, 9.0)


def test_failures_of_a_model_that_draws_every_prompt_exactly():
    """A perfect model fails no check on either split: the images are judged against their own prompts."""
    for split in ("heldin", "heldout"):
        rates = failures(RenderingPipe(), split, prompts=6, images_per_prompt=2)
        assert rates == {"pass": 1.0, "background": 0.0, "count": 0.0, "colour": 0.0, "shape": 0.0, "size": 0.0,
                         "cell": 0.0}


def test_position_response_of_a_model_that_ignores_them():
    """Every object drawn at the centre: found 1, right only when the centre was asked (1 of 9), one cell."""
    r = position_response(RenderingPipe(fixed="center"), (1, 4, 16, 16), noises=2)
    assert r.found == 1.0 and r.right_cell == pytest.approx(1 / 9) and r.distinct_cells == 1.0


def test_the_teacher_reads_its_caption_at_high_noise():
    """On the shipped UNet teacher the x_0 error at t = 999 is lower with the true caption than with none, and
    every changed-attribute column is there (a misaligned caption list would lose the first inequality)."""
    from pipelines.backbones import load_bundle
    from pipelines.toy.probes import conditioning_gain

    table = conditioning_gain(load_bundle("toy"), timesteps=(999,), n=16)
    row = table[999]
    assert set(row) == {"true", *CHANGED, "empty"}
    assert row["true"] < row["empty"] and row["true"] < row["colour"]
