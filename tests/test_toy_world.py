"""The toy world's generator: determinism, grammar round trips, the held-out split, geometry."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from pipelines.toy import world
from pipelines.toy.world import (
    HELDOUT_COMBINATIONS, OBJECT_COLOURS, PALETTE, SHAPES, ObjectSpec, Scene, SceneSpec, ToyDataset,
    caption, is_feasible, is_heldout, parse_caption, place, render, sample_scene, sample_spec, vocabulary,
)
from pipelines.toy.prompts import EVAL_PROMPT_COUNT, HELDIN_PROMPTS, HELDOUT_PROMPTS, toy_prompts


def _scenes(n, seed=0, split="train"):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def test_same_seed_same_pairs_and_different_seeds_differ():
    a, b, c = _scenes(50, seed=1), _scenes(50, seed=1), _scenes(50, seed=2)
    assert a == b
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a, b))
    assert [caption(x) for x in a] != [caption(x) for x in c]


def test_caption_examples_from_the_grammar():
    one = SceneSpec((ObjectSpec("small", "red", "circle", "top left"),), "blue")
    assert caption(one) == "a small red circle at the top left on a blue background"
    two = SceneSpec((ObjectSpec("small", "yellow", "triangle", "right"),
                     ObjectSpec("large", "green", "square", "left")), "orange")
    # Canonical order puts the left object first whatever order the spec lists them in.
    assert caption(two) == ("a large green square at the left and a small yellow triangle at the right "
                            "on an orange background")


def test_parse_caption_inverts_caption():
    for scene in _scenes(2000, seed=3) + _scenes(500, seed=4, split="heldout"):
        text = caption(scene)
        assert parse_caption(text) == scene.spec
        assert caption(parse_caption(text)) == text


@pytest.mark.parametrize("bad", [
    "a small red circle at the top left",                                    # no background
    "a small red circle at the top left on a blue ground",
    "a small pink circle at the top left on a blue background",              # unknown colour
    "a medium red circle at the top left on a blue background",              # unknown size
    "a small red circle at the middle on a blue background",                 # unknown position
    "a small red circle at the left on an blue background",                  # wrong article
    "a small red circle at the left and a small blue square at the left on a gray background",
])
def test_parse_caption_rejects_what_the_grammar_cannot_say(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_objects_are_in_canonical_order_left_to_right_then_top_to_bottom():
    for scene in _scenes(1000, seed=5):
        cells = [o.cell for o in scene.spec.objects]
        assert cells == sorted(cells, key=lambda rc: (rc[1], rc[0]))


def test_training_sampler_never_emits_a_heldout_combination():
    seen = set()
    for scene in _scenes(5000, seed=6):
        for o in scene.spec.objects:
            assert not is_heldout(o), caption(scene)
            seen.add((o.colour, o.shape))
    # Every training combination occurs, so every colour and every shape is learnable.
    assert seen == set(world.TRAIN_COMBINATIONS)
    assert {c for c, _ in seen} == set(OBJECT_COLOURS) and {s for _, s in seen} == set(SHAPES)


def test_heldout_split_is_a_sixth_of_combinations_and_every_heldout_scene_uses_one():
    assert len(HELDOUT_COMBINATIONS) / (len(OBJECT_COLOURS) * len(SHAPES)) == pytest.approx(3 / 18)
    for scene in _scenes(1000, seed=7, split="heldout"):
        assert any(is_heldout(o) for o in scene.spec.objects)


def test_background_differs_from_object_colours_and_objects_use_distinct_cells():
    for scene in _scenes(2000, seed=8):
        colours = {o.colour for o in scene.spec.objects}
        assert scene.spec.background not in colours
        assert len({o.position for o in scene.spec.objects}) == len(scene.spec.objects)


def test_two_objects_never_touch_in_the_rendered_image():
    """Render each object alone; their pixels, grown by one, must stay disjoint."""
    two = [s for s in _scenes(600, seed=9) if len(s.spec.objects) == 2]
    assert len(two) > 100
    for scene in two:
        masks = []
        for obj, centre in zip(scene.spec.objects, scene.centres):
            alone = render(Scene(SceneSpec((obj,), scene.spec.background), (centre,)))
            masks.append(ndimage.binary_dilation((alone != PALETTE[scene.spec.background]).any(-1)))
        assert not (masks[0] & masks[1]).any(), caption(scene)


def test_adjacent_cells_are_infeasible_and_place_refuses_them():
    spec = SceneSpec((ObjectSpec("small", "red", "circle", "left"), ObjectSpec("small", "blue", "circle", "center")),
                     "gray")
    assert not is_feasible(spec)
    with pytest.raises(ValueError):
        place(spec, np.random.default_rng(0))


def test_render_draws_the_scene_at_any_resolution():
    spec = SceneSpec((ObjectSpec("large", "red", "square", "center"),), "blue")
    scene = place(spec, np.random.default_rng(0))
    for res in (24, 32, 48):
        image = render(scene, res)
        assert image.shape == (res, res, 3) and image.dtype == np.uint8
        assert tuple(image[0, 0]) == PALETTE["blue"]
        assert tuple(image[res // 2, res // 2]) == PALETTE["red"]
    # A large square (half extent 7/32) covers (14 px)^2 of a 32x32 image, up to edge blending.
    red = (render(scene) == PALETTE["red"]).all(-1).sum()
    assert 12**2 <= red <= 14**2


def test_vocabulary_covers_every_caption_word_once():
    words = vocabulary()
    assert len(words) == len(set(words))
    used = {w for s in _scenes(2000, seed=10) for w in caption(s).split()}
    assert used <= set(words)
    assert {"an", "orange", "background", "center"} <= set(words)


def test_dataset_items_follow_the_trainer_contract_and_are_deterministic():
    data = ToyDataset(split="train", size=8, seed=3, resolution=32)
    item = data[5]
    assert set(item) == {"pixel_values", "prompt", "skipped"}
    x = item["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert item["skipped"] == 0
    assert parse_caption(item["prompt"]) == data.scene(5).spec
    assert torch.equal(x, ToyDataset(split="train", size=8, seed=3)[5]["pixel_values"])
    assert item["prompt"] != ToyDataset(split="heldout", size=8, seed=3)[5]["prompt"]
    assert len(data) == 8
    with pytest.raises(IndexError):
        data[8]
    with pytest.raises(ValueError):
        ToyDataset(split="test")


def test_toy_prompts_are_deterministic_distinct_and_respect_the_split():
    heldin, heldout = toy_prompts("heldin", 200, seed=1), toy_prompts("heldout", 200, seed=1)
    assert heldin == toy_prompts("heldin", 200, seed=1) and heldin != toy_prompts("heldin", 200, seed=2)
    assert toy_prompts("heldin", 50, seed=1) == heldin[:50]
    assert len(set(heldin)) == 200 and len(set(heldout)) == 200
    assert not any(is_heldout(o) for p in heldin for o in parse_caption(p).objects)
    assert all(any(is_heldout(o) for o in parse_caption(p).objects) for p in heldout)


def test_sample_spec_rejects_unknown_split():
    with pytest.raises(ValueError):
        sample_spec(np.random.default_rng(0), "heldin-ish")


def test_fixed_evaluation_lists_are_the_seed_0_prompts_and_disjoint():
    assert list(HELDIN_PROMPTS) == toy_prompts("heldin", EVAL_PROMPT_COUNT, seed=0)
    assert list(HELDOUT_PROMPTS) == toy_prompts("heldout", EVAL_PROMPT_COUNT, seed=0)
    assert not set(HELDIN_PROMPTS) & set(HELDOUT_PROMPTS)
    assert world.toy_prompts is toy_prompts  # also reachable from the world module
