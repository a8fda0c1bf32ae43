"""Contrast sets of the toy world: one change per variant, drawable, train-split only, judged against the
original caption."""
import numpy as np
import pytest

from pipelines.toy.checker import check_batch
from pipelines.toy.contrasts import DRIFT, SPEC_CHANGES, contrast_set, drifted, render_contrast_sets, variants
from pipelines.toy.world import (MARGIN, MIN_GAP, SIZES, TRAIN_COMBINATIONS, ObjectSpec, SceneSpec, _gap, caption,
                                 is_feasible, sample_scene, sample_spec)

TWO = SceneSpec((ObjectSpec("small", "red", "circle", "left"), ObjectSpec("large", "blue", "square", "right")),
                "gray")


def _differences(a: SceneSpec, b: SceneSpec) -> set[str]:
    """Which of SPEC_CHANGES turn a into b, read off by comparing objects cell by cell."""
    diff = {"background"} if a.background != b.background else set()
    if len(a.objects) != len(b.objects):
        return diff | {"drop"}
    for x, y in zip(sorted(a.objects, key=lambda o: o.position), sorted(b.objects, key=lambda o: o.position)):
        diff |= {k for k in ("shape", "colour", "size") if getattr(x, k) != getattr(y, k)}
    if {o.position for o in a.objects} != {o.position for o in b.objects}:
        diff = {"position"}  # a moved object is compared against the wrong one above; the move is the change
    return diff


@pytest.mark.parametrize("kind", SPEC_CHANGES)
def test_each_variant_changes_exactly_its_kind_and_stays_drawable_in_the_train_split(kind):
    rng = np.random.default_rng(0)
    specs = [TWO] + [sample_spec(rng, "train") for _ in range(40)]
    found = 0
    for spec in specs:
        for v in variants(spec, kind):
            found += 1
            assert _differences(spec, v) == {kind}, (caption(spec), caption(v))
            assert is_feasible(v) and all((o.colour, o.shape) in TRAIN_COMBINATIONS for o in v.objects)
    assert found > len(specs) // 2, f"too few {kind} variants: {found}"


def test_hand_counted_variants_of_a_two_object_scene():
    """TWO = small red circle (left) + large blue square (right) on gray.
    shape: red square, red triangle; blue circle, blue triangle = 4 (all train pairs).
    colour: red circle -> orange (held out with circle), yellow, green, blue, purple: 4 (gray is no object
    colour); blue square -> red, orange, yellow, purple (green square is held out): 4; 8 in all.
    position: two objects need non-adjacent cells, so the circle may go to top left or bottom left (column 0)
    and the square to top right or bottom right (column 2): 4.
    size: circle -> large puts two large objects at x = 8/32 and 24/32 (centres pulled in to r + margin),
    gap 16/32 - 14/32 = 2/32 = MIN_GAP, drawable; square -> small, drawable: 2.
    background: 9 colours minus gray, red and blue = 6.  drop: 2."""
    assert len(variants(TWO, "shape")) == 4
    assert len(variants(TWO, "colour")) == 8
    assert len(variants(TWO, "position")) == 4
    assert len(variants(TWO, "size")) == 2
    assert len(variants(TWO, "background")) == 6
    assert len(variants(TWO, "drop")) == 2
    assert variants(SceneSpec(TWO.objects[:1], "gray"), "drop") == []
    with pytest.raises(ValueError, match="change must be one of"):
        variants(TWO, "rotation")


def test_contrast_sets_start_with_the_scene_hold_distinct_variants_and_fail_the_checker():
    """Candidate 0 of a rendered set is its caption's scene, so the exact checker passes it; every variant
    misses one checked attribute (background, count, colour, shape, size or cell), so the checker fails it."""
    images, prompts = render_contrast_sets(24, 4, seed=3, changes=SPEC_CHANGES)
    assert images.shape == (24, 4, 3, 32, 32) and len(prompts) == 24
    assert images.min() >= -1 and images.max() <= 1
    first = check_batch(images[:, 0], prompts)
    rest = check_batch(images[:, 1:].flatten(0, 1), [p for p in prompts for _ in range(3)])
    assert first.all() and not rest.any()
    again, same = render_contrast_sets(24, 4, seed=3, changes=SPEC_CHANGES)
    assert same == prompts and (again == images).all(), "seeded"
    rng = np.random.default_rng(1)
    chosen = contrast_set(TWO, 6, rng)
    assert chosen[0].spec == TWO and len(set(chosen)) == 6
    with pytest.raises(ValueError, match="k >= 2"):
        contrast_set(TWO, 1, rng)
    with pytest.raises(ValueError, match="changes must be among"):
        contrast_set(TWO, 3, rng, changes=("shape", "rotation"))


def test_drift_moves_one_object_a_third_to_half_a_cell_and_keeps_the_scene_drawable():
    """A drifted scene keeps its spec (so its caption); exactly one centre moves, by DRIFT = 11/96 to 16/96
    of the side along x, y or both (a diagonal moves that much on each axis), the object stays MARGIN inside
    the frame and two objects keep MIN_GAP. Drift-only contrast sets are k distinct scenes of one spec."""
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(200):
        scene = sample_scene(rng)
        new = drifted(scene, rng)
        if new is None:
            continue
        moved += 1
        assert new.spec == scene.spec
        shifts = [np.subtract(b, a) for a, b in zip(scene.centres, new.centres)]
        changed = [d for d in shifts if np.abs(d).max() > 0]
        assert len(changed) == 1
        steps = np.abs(changed[0])[np.abs(changed[0]) > 1e-12]
        assert ((steps >= DRIFT[0] - 1e-9) & (steps <= DRIFT[1] + 1e-9)).all() and len(set(steps.round(9))) == 1
        for obj, (x, y) in zip(new.spec.objects, new.centres):
            r = SIZES[obj.size] + MARGIN
            assert r - 1e-9 <= x <= 1 - r + 1e-9 and r - 1e-9 <= y <= 1 - r + 1e-9
        if len(new.centres) == 2:
            assert _gap(new.spec.objects[0], new.centres[0], new.spec.objects[1], new.centres[1]) >= MIN_GAP - 1e-9
    assert moved > 150
    only = contrast_set(TWO, 4, np.random.default_rng(2), changes=("drift",))
    assert {s.spec for s in only} == {TWO} and len(set(only)) == 4
