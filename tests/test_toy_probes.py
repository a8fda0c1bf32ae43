"""The toy probes: their counting checked on pipelines whose answer is known, and the gain table on the teacher."""
import dataclasses
from types import SimpleNamespace

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.conditioning import Conditioning
from pipelines.schedules import VPSchedule
from pipelines.toy.probes import (ANALOGY_PLAN, CHANGED, analogy_states, contrast_guided, failures, position_response,
                                  shape_contrast_failures, shape_readout, text_states, unseen_pair_failures)
from pipelines.toy.world import (OBJECT_COLOURS, SHAPES, ObjectSpec, SceneSpec, caption, parse_caption, place, render,
                                 vocabulary)

TOY = Path(__file__).resolve().parents[1] / "pipelines" / "toy"


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


class WordPipe:
    """A text tower whose state at each position is the one-hot of the word there (linear in the words) and a
    denoiser that reads the words back (argmax per position) and draws that caption's scene exactly."""

    device = "cpu"
    words = ["<pad>", *vocabulary()]

    class tokenizer:  # noqa: N801 - stands in for the pipeline's tokenizer attribute
        model_max_length = 16

        def __new__(cls, texts, **kwargs):
            ids = torch.zeros(len(texts), cls.model_max_length, dtype=torch.long)
            for row, text in enumerate(texts):
                for col, word in enumerate(text.split()):
                    ids[row, col] = WordPipe.words.index(word)
            return SimpleNamespace(input_ids=ids)

    def text_encoder(self, ids):
        return (torch.nn.functional.one_hot(ids, len(self.words)).float(),)

    def __call__(self, prompt_embeds=None, negative_prompt_embeds=None, **kwargs):
        rng = np.random.default_rng(0)
        texts = [" ".join(self.words[i] for i in row.argmax(-1).tolist() if i) for row in prompt_embeds]
        return SimpleNamespace(images=np.stack([render(place(parse_caption(t), rng)) / 255.0 for t in texts]))


def test_analogy_states_of_a_tower_linear_in_its_words_are_the_unseen_captions_own():
    """With one-hot word states E is linear and the three captions differ only in the colour and shape slots:
    at the colour slot onehot(c) + onehot(d) - onehot(d) = onehot(c), at the shape slot onehot(s') + onehot(s) -
    onehot(s') = onehot(s), elsewhere x + x - x = x; so the analogy is E(c, s) exactly, and a denoiser that
    draws what the states say passes every condition (the analogy judged against the asked caption, the donor
    pair against its own: swapping either would fail the colour or shape check)."""
    pipe = WordPipe()
    encode = lambda texts: text_states(pipe, texts)  # noqa: E731
    scenes = [("small", "top left", "white"), ("large", "center", "gray")]
    make = lambda c, s: [caption(SceneSpec((ObjectSpec(z, c, s, p),), b)) for z, p, b in scenes]  # noqa: E731
    for (colour, shape), (seen_shape, donor) in ANALOGY_PLAN.items():
        assert torch.equal(analogy_states(encode, make, colour, shape, seen_shape, donor), encode(make(colour, shape)))
    rates = unseen_pair_failures(pipe, per_pair=3, images_per_prompt=1)
    assert set(rates) == {"purple triangle", "orange circle", "green square"}
    for pair in rates.values():
        assert {name: r["pass"] for name, r in pair.items()} == {"own": 1.0, "analogy": 1.0, "donor_pair": 1.0}


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


class PairTower(torch.nn.Module):
    """A stand-in text tower whose state at a shape word is built from (colour before it, shape):
    "additive": one-hot(colour) next to one-hot(shape), so a shape is readable whatever its colour;
    "entangled": one-hot of the (colour, shape) pair, so an unseen pair shares no direction with any seen one."""

    def __init__(self, tokenizer, kind: str):
        super().__init__()
        self.tokenizer, self.kind = tokenizer, kind
        self.pairs = [(c, s) for c in OBJECT_COLOURS for s in SHAPES]

    def vector(self, colour: str, shape: str) -> torch.Tensor:
        if self.kind == "additive":
            return torch.cat([torch.eye(len(OBJECT_COLOURS))[list(OBJECT_COLOURS).index(colour)],
                              torch.eye(len(SHAPES))[SHAPES.index(shape)]])
        return torch.eye(len(self.pairs))[self.pairs.index((colour, shape))]

    def forward(self, ids):
        width = len(self.vector("red", "circle"))
        states = torch.zeros(*ids.shape, width)
        for b, row in enumerate(ids.tolist()):
            words = [w.removesuffix("</w>") for w in self.tokenizer.convert_ids_to_tokens(row)]
            for i, word in enumerate(words):
                if word in SHAPES:
                    states[b, i] = self.vector(words[i - 1], word)
        return SimpleNamespace(last_hidden_state=states)


def _toy_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOY / "teacher" / "tokenizer")


def test_shape_readout_of_a_tower_that_composes():
    """Additive states: the linear map read off the seen pairs reads every unseen pair's shape (1.0). An
    unseen pair's vector (c, s) against a seen (c, s') or (c', s): one shared unit of two, cosine 1/2."""
    r = shape_readout(PairTower(_toy_tokenizer(), "additive"), _toy_tokenizer(), per_pair=3)
    assert (r.seen, r.unseen) == (1.0, 1.0)
    assert all(v == pytest.approx(0.5) for near in r.nearest.values() for v in near.values())


def test_shape_readout_of_a_tower_that_does_not():
    """Entangled states: an unseen pair's direction is orthogonal to every seen one, so the fitted map gives it
    only its intercept: one class for all three unseen pairs, whose shapes are the three different shapes, so
    exactly 1 in 3 is right; seen pairs are fitted exactly (1.0); every cosine to a seen pair is 0."""
    r = shape_readout(PairTower(_toy_tokenizer(), "entangled"), _toy_tokenizer(), per_pair=3)
    assert r.seen == 1.0 and r.unseen == pytest.approx(1 / 3)
    assert all(v == pytest.approx(0.0) for near in r.nearest.values() for v in near.values())


def test_the_shipped_text_tower_carries_the_shape_of_unseen_pairs():
    """docs/toy_world.md: the toy CLIP's text tower is not what stops held-out composition; a linear map fitted
    on seen pairs reads the shape of unseen ones from the shape word's state."""
    from transformers import CLIPTextModel

    tower = CLIPTextModel.from_pretrained(TOY / "teacher" / "text_encoder").eval()
    r = shape_readout(tower, _toy_tokenizer(), per_pair=20)
    assert r.seen == 1.0 and r.unseen >= 0.9


def test_contrast_guided_adds_the_push_away_from_the_contrasts_to_cfg():
    """Stub raw outputs, one constant per conditioning: u = 1, c = 3, contrasts n_1 = 0, n_2 = 2 (mean 1).
    g = 2.5, s = 2: out = u + g (c - u) + s (c - mean n) = 1 + 2.5 * 2 + 2 * (3 - 1) = 10.
    s = 0 with no contrasts is CFG alone: 1 + 2.5 * 2 = 6. prediction_type "sample" makes x0_hat = out, and all
    four branches go through one call of batch 4B (the uncond of batch 1 repeated)."""
    calls = []

    def predict(x_t, t, cond):
        calls.append(x_t.shape[0])
        return cond.kwargs["encoder_hidden_states"][:, :, None, None].expand_as(x_t).clone()

    def constant(value: float, batch: int = 2) -> Conditioning:
        return Conditioning({"encoder_hidden_states": torch.full((batch, 3), value, dtype=torch.float64)})

    schedule = VPSchedule(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))
    x, t = torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.full((2,), 500.0, dtype=torch.float64)
    x0_hat, _ = contrast_guided(predict, constant(3.0), constant(1.0, 1), [constant(0.0), constant(2.0)], 2.5, 2.0,
                                "sample", schedule)(x, t)
    assert calls == [8] and torch.all(x0_hat == 10.0)
    x0_hat, _ = contrast_guided(predict, constant(3.0), constant(1.0, 1), [], 2.5, 0.0, "sample", schedule)(x, t)
    assert calls == [8, 4] and torch.all(x0_hat == 6.0)


class RenderingBundle:
    """A perfect x_0 predictor: the 'latent' is the image, and the prediction for a caption is its rendered scene
    (one fixed placement per caption), so deterministic DDIM ends on exactly that image."""

    prediction_type = "sample"
    schedule = VPSchedule(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))
    denoiser = None

    def __init__(self):
        self.captions: list[str] = []

    def encode_prompt(self, prompts):
        ids = torch.arange(len(self.captions), len(self.captions) + len(prompts), dtype=torch.float32)
        self.captions += list(prompts)
        return Conditioning({"encoder_hidden_states": ids[:, None]})

    def encode_unconditional(self, batch_size):
        return self.encode_prompt([""] * batch_size)

    def latent_shape(self, batch_size):
        return (batch_size, 3, 32, 32)

    def predict(self, denoiser, x_t, t, cond):
        out = []
        for i in cond.kwargs["encoder_hidden_states"][:, 0].long().tolist():
            text = self.captions[i]
            image = render(place(parse_caption(text), np.random.default_rng(0))) if text else np.full((32, 32, 3), 128)
            out.append(torch.as_tensor(image, dtype=torch.float64).permute(2, 0, 1) / 127.5 - 1)
        return torch.stack(out).to(x_t.dtype)

    def decode_latents(self, latents):
        return latents


def test_shape_contrast_failures_of_a_model_that_draws_every_caption_exactly():
    """Under plain guidance (s = 0, g = 1: out = c), a perfect model passes every scene, the unseen pairs and their
    seen controls alike; the rows are keyed by pair, then unseen / seen, then scale."""
    rows = shape_contrast_failures(RenderingBundle(), scales=(0.0,), per_pair=3, images_per_prompt=2, steps=2,
                                   guidance=1.0)
    assert set(rows) == {f"{c} {s}" for c, s in ANALOGY_PLAN}
    for pair in rows.values():
        assert set(pair) == {"unseen", "seen"}
        assert all(pair[kind]["0"]["pass"] == 1.0 and pair[kind]["0"]["shape"] == 0.0 for kind in pair)
