"""Preference datasets: folder and Pick-a-Pic layouts, ties and swapped pairs, KTO labels, skips."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import trainers.preference_data as pd
from trainers.data import BUILDERS, DataConfig, build_dataset

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)


def png(folder, name, colour, size=(16, 16)):
    Image.new("RGB", size, colour).save(folder / name)
    return name


def jpeg_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def config(kind, path, **kw) -> DataConfig:
    return DataConfig(kind=kind, path=str(path), resolution=16, **kw)


@pytest.fixture()
def folder(tmp_path):
    rows = []
    for i in range(3):
        rows.append({"prompt": f"p{i}", "chosen": png(tmp_path, f"w{i}.png", WHITE),
                     "rejected": png(tmp_path, f"l{i}.png", BLACK)})
    (tmp_path / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_kinds_are_registered_and_validated_by_dataconfig():
    for kind in pd.PAIRED_KINDS + pd.LABELLED_KINDS:
        assert kind in BUILDERS
        DataConfig(kind=kind)  # would raise if the kind were unknown


def test_preference_folder_items_put_the_winner_first(folder):
    ds = build_dataset(config("preference_folder", folder))
    item = ds[1]
    assert set(item) == {"pixel_values_w", "pixel_values_l", "prompt", "skipped", "index"}
    assert item["prompt"] == "p1" and item["skipped"] == 0
    assert item["pixel_values_w"].shape == (3, 16, 16)
    assert torch.allclose(item["pixel_values_w"], torch.ones(3, 16, 16))
    assert torch.allclose(item["pixel_values_l"], -torch.ones(3, 16, 16))


def test_preference_folder_skips_and_counts_unreadable_pairs(folder):
    (folder / "w1.png").write_bytes(b"not an image")
    ds = pd.PreferenceFolder(str(folder / "preferences.jsonl"), resolution=16)
    item = ds[1]
    assert item["skipped"] == 1 and item["prompt"] == "p2"


def test_preference_folder_missing_column_is_one_clear_error(tmp_path):
    (tmp_path / "preferences.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="record 1 has no column 'rejected'"):
        pd.PreferenceFolder(str(tmp_path), resolution=16)


def test_both_images_of_a_pair_share_crop_and_flip(tmp_path):
    """Identical, asymmetric, non-square images: with random crops and flips the two tensors stay equal."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        array = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
        for side in ("w", "l"):
            Image.fromarray(array).save(tmp_path / f"{side}{i}.png")
        rows.append({"prompt": "p", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (tmp_path / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = pd.PreferenceFolder(str(tmp_path), resolution=16, center_crop=False, random_flip=True, seed=3)
    for i in range(6):
        item = ds[i]
        assert torch.equal(item["pixel_values_w"], item["pixel_values_l"])


def test_pickapic_pairs_hand_example():
    """label_0 = (1, 0, .5, nan): row 0 keeps slot 0 as winner, row 1 is swapped (slot 1), the tie
    is dropped or kept with slot 0, the unlabelled row is always dropped."""
    labels = np.array([1.0, 0.0, 0.5, np.nan])
    rows, slot = pd.pickapic_pairs(labels, keep_ties=False)
    assert rows.tolist() == [0, 1] and slot.tolist() == [0, 1]
    rows, slot = pd.pickapic_pairs(labels, keep_ties=True)
    assert rows.tolist() == [0, 1, 2] and slot.tolist() == [0, 1, 0]


def test_pickapic_desirable_hand_example():
    """Pairs (a beats b), (c beats a), (b ties d): a won once -> +1; c +1; b, d never won -> -1.
    Each uid appears once, at its first slot."""
    rows, slots, labels = pd.pickapic_desirable(np.array([1.0, 0.0, 0.5]), np.array(["a", "a", "b"]),
                                                np.array(["b", "c", "d"]))
    got = {(int(r), int(s)): float(y) for r, s, y in zip(rows, slots, labels)}
    assert got == {(0, 0): 1.0, (0, 1): -1.0, (1, 1): 1.0, (2, 1): -1.0}


@pytest.fixture()
def pickapic_parquet(tmp_path):
    import datasets

    table = {"jpg_0": [jpeg_bytes(WHITE), jpeg_bytes(BLACK), jpeg_bytes(GREY)],
             "jpg_1": [jpeg_bytes(BLACK), jpeg_bytes(WHITE), jpeg_bytes(BLACK)],
             "label_0": [1.0, 0.0, 0.5], "caption": ["first", "swapped", "tie"],
             "image_0_uid": ["w", "k", "g"], "image_1_uid": ["k", "w", "k"]}
    path = tmp_path / "train-00000.parquet"
    datasets.Dataset.from_dict(table).to_parquet(str(path))
    return tmp_path


def test_pickapic_drops_ties_and_unswaps(pickapic_parquet):
    ds = build_dataset(config("pickapic", pickapic_parquet))
    assert len(ds) == 2
    for i in range(2):
        item = ds[i]
        assert item["prompt"] in {"first", "swapped"}
        assert item["pixel_values_w"].mean() > 0.9 and item["pixel_values_l"].mean() < -0.9


def test_pickapic_with_ties_keeps_them_with_jpg_0_first(pickapic_parquet):
    ds = build_dataset(config("pickapic_with_ties", pickapic_parquet / "train-00000.parquet"))
    assert len(ds) == 3
    tie = ds[2]
    assert tie["prompt"] == "tie" and abs(float(tie["pixel_values_w"].mean())) < 0.1


def test_pickapic_labelled_uses_uids(pickapic_parquet):
    ds = build_dataset(config("pickapic_labelled", pickapic_parquet))
    labels = {round(float(ds[i]["pixel_values"].mean()), 1): float(ds[i]["label"]) for i in range(len(ds))}
    assert len(ds) == 3  # uids w, k, g
    assert labels == {1.0: 1.0, -1.0: -1.0, 0.0: -1.0}  # white won twice, black (k) never, grey tied


def test_pickapic_missing_column_is_named(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"jpg_0": [b""], "caption": ["x"]}).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(ValueError, match=r"lacks Pick-a-Pic column\(s\) \['jpg_1', 'label_0'\]"):
        pd.PickAPicPairs(str(tmp_path), keep_ties=False, resolution=16)


def test_labelled_folder_reads_labels_and_unpairs_preferences(folder):
    png(folder, "g.png", GREY)
    lines = [{"prompt": "a", "image": "g.png", "label": -1}, {"prompt": "b", "chosen": "w0.png", "rejected": "l0.png"},
             {"prompt": "c", "image": "w1.png", "label": True}]
    (folder / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ds = build_dataset(config("labelled_folder", folder))
    assert len(ds) == 4
    assert [float(ds[i]["label"]) for i in range(4)] == [-1.0, 1.0, -1.0, 1.0]
    assert set(ds[0]) == {"pixel_values", "label", "prompt", "skipped", "index"}
    bad = folder / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "image": "g.png", "label": 3}) + "\n")
    with pytest.raises(ValueError, match="label 3 is not"):
        pd.LabelledFolder(str(bad), resolution=16)


# ------------------------------------------------------------------ scripts/make_preferences.py


def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_preferences.py"
    spec = importlib.util.spec_from_file_location("make_preferences", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rank_samples_best_and_worst_or_none_on_ties():
    """scores (.2, .9, .1, .9): best is the first .9 (index 1), worst .1 (index 2); all equal -> no pair."""
    mp = _script()
    assert mp.rank_samples([0.2, 0.9, 0.1, 0.9]) == (1, 2)
    assert mp.rank_samples([1.0, 1.0, 1.0]) is None


def test_all_pairs_orders_every_strict_pair_and_drops_ties():
    """scores (.2, .9, .1, .9): index pairs (0,1) .2<.9 -> (1,0); (0,2) .2>.1 -> (0,2); (0,3) -> (3,0);
    (1,2) -> (1,2); (1,3) tie, dropped; (2,3) -> (3,2). 5 of the 4*3/2 = 6 pairs."""
    mp = _script()
    assert mp.all_pairs([0.2, 0.9, 0.1, 0.9]) == [(1, 0), (0, 2), (3, 0), (1, 2), (3, 2)]
    assert mp.all_pairs([1.0, 1.0]) == []


def test_min_gap_keeps_pairs_whose_scores_differ_enough():
    """scores (.2, .9, .1, .5). Extremes: best .9 (1) vs worst .1 (2), gap .8: kept at min_gap .8, dropped
    at .81. All pairs with their gaps: (1,0) .7, (0,2) .1, (3,0) .3, (1,2) .8, (1,3) .4, (3,2) .4; at
    min_gap .35 the four with gap >= .35 remain, in all_pairs order: (1,0), (1,2), (1,3), (3,2)."""
    mp = _script()
    names = [f"images/000000_{k}.png" for k in range(4)]
    record = {"prompt": "p", "images": names, "scores": [0.2, 0.9, 0.1, 0.5], "chosen": names[1], "rejected": names[2]}
    pairs = lambda kind, gap: [(names.index(r["chosen"]), names.index(r["rejected"]))  # noqa: E731
                               for r in mp.record_pairs(record, kind, gap)]
    assert pairs("extremes", 0.8) == [(1, 2)] and pairs("extremes", 0.81) == []
    assert pairs("all", 0.0) == [(1, 0), (0, 2), (3, 0), (1, 2), (1, 3), (3, 2)]
    assert pairs("all", 0.35) == [(1, 0), (1, 2), (1, 3), (3, 2)]
    tie = {**record, "scores": [0.5] * 4, "chosen": None, "rejected": None}
    assert mp.record_pairs(tie, "extremes") == [] and mp.record_pairs(tie, "all") == []
    with pytest.raises(SystemExit):
        mp.parse_args(["--relabel-from", "x", "--out", "y", "--min-gap", "-1"])


def test_merge_parts_all_pairs_from_the_same_parts(tmp_path):
    """3 distinct greys per prompt: extremes gives 1 pair per prompt, all gives 3, every one brighter-first;
    an unknown pairing is one clear error."""
    mp = _script()
    out = tmp_path / "prefs"
    mp.make_preferences(_grey_sampler, _brightness, ["p0", "p1"], out, samples=3, seed=1)
    assert mp.merge_parts(out, "extremes") == 2
    assert mp.merge_parts(out, "all") == 6
    ds = pd.PreferenceFolder(str(out), resolution=16)
    assert len(ds) == 6 and all(ds[i]["pixel_values_w"].mean() > ds[i]["pixel_values_l"].mean() for i in range(6))
    with pytest.raises(ValueError, match="pairs must be one of"):
        mp.merge_parts(out, "best")


def _grey_sampler(batch, seeds):
    """Each sample a flat grey drawn from its own seed."""
    levels = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(s)) for s in seeds]) * 2 - 1
    return levels[:, None, None, None].expand(len(batch), 3, 16, 16).clone()


def _brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_make_preferences_is_sharded_resumable_and_loadable(tmp_path):
    mp = _script()
    prompts = [f"prompt {i}" for i in range(5)]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert mp.make_preferences(_grey_sampler, _brightness, prompts, single, samples=3, seed=1) == 5
    assert mp.make_preferences(_grey_sampler, _brightness, prompts, single, samples=3, seed=1) == 0  # resumed
    done = [mp.make_preferences(_grey_sampler, _brightness, prompts, sharded, samples=3, seed=1, rank=r, world_size=2)
            for r in range(2)]
    assert done == [3, 2]
    assert mp.merge_parts(single) == 5 and mp.merge_parts(sharded) == 5
    assert (single / "preferences.jsonl").read_text() == (sharded / "preferences.jsonl").read_text()
    ds = pd.PreferenceFolder(str(single), resolution=16)
    for i in range(len(ds)):
        item = ds[i]
        assert item["pixel_values_w"].mean() > item["pixel_values_l"].mean()


def test_make_preferences_with_a_tiny_pipeline_and_a_tie(tmp_path):
    """The real sampler on a tiny SD bundle; a reward that ties every sample yields no pair."""
    from pipelines.tiny import tiny_bundle
    from trainers.method import initial_noise
    from pipelines.sampling import sample_images

    mp = _script()
    bundle = tiny_bundle("sd")

    def sample(batch, seeds):
        x_T = initial_noise(bundle.latent_shape(1, (16, 16))[1:], seeds, "cpu")
        return sample_images(bundle, bundle.denoiser, batch, 2, 1.0, x_T, (16, 16))

    assert mp.make_preferences(sample, _brightness, ["a red circle"], tmp_path / "a", samples=2) == 1
    assert mp.merge_parts(tmp_path / "a") == 1
    record = json.loads((tmp_path / "a" / "parts" / "000000.json").read_text())
    assert record["scores"][0] != record["scores"][1]
    flat = lambda images, prompts: torch.zeros(len(prompts))  # noqa: E731
    mp.make_preferences(sample, flat, ["a red circle"], tmp_path / "b", samples=2)
    assert mp.merge_parts(tmp_path / "b") == 0


def test_relabel_reranks_the_same_images_with_another_reward(tmp_path):
    """Brightness picks the brightest/darkest grey; its negative must swap every pair, on the same
    image files, and a rerun resumes (0 new prompts)."""
    mp = _script()
    prompts = [f"prompt {i}" for i in range(4)]
    src, out = tmp_path / "bright", tmp_path / "dark"
    mp.make_preferences(_grey_sampler, _brightness, prompts, src, samples=3, seed=1)
    darkness = lambda images, prompts: -_brightness(images, prompts)  # noqa: E731
    assert mp.relabel(src, darkness, out) == 4 and mp.relabel(src, darkness, out) == 0
    assert mp.merge_parts(src) == 4 and mp.merge_parts(out) == 4
    a = [json.loads(line) for line in (src / "preferences.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        assert (out / y["chosen"]).resolve() == (src / x["rejected"]).resolve()
        assert (out / y["rejected"]).resolve() == (src / x["chosen"]).resolve()
    ds = pd.PreferenceFolder(str(out), resolution=16)
    assert all(ds[i]["pixel_values_w"].mean() < ds[i]["pixel_values_l"].mean() for i in range(len(ds)))
    with pytest.raises(ValueError, match="another folder"):
        mp.relabel(src, darkness, src)
    with pytest.raises(FileNotFoundError, match="no parts"):
        mp.relabel(tmp_path / "empty", darkness, tmp_path / "x")


def test_flip_labels_swaps_an_exact_seeded_share(tmp_path):
    """8 pairs (white over black) at flip_labels 0.25: round(0.25 * 8) = 2 pairs come out black over white,
    the same 2 in a second build; KTO lines unpaired from them negate the same way (16 items, 4 flipped)."""
    rows = [{"prompt": f"p{i}", "chosen": png(tmp_path, f"w{i}.png", WHITE), "rejected": png(tmp_path, f"l{i}.png", BLACK)}
            for i in range(8)]
    (tmp_path / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    noisy = build_dataset(config("preference_folder", tmp_path, flip_labels=0.25))
    swapped = [i for i in range(8) if noisy[i]["pixel_values_w"].mean() < noisy[i]["pixel_values_l"].mean()]
    assert len(swapped) == 2
    assert [i for i in range(8) if noisy[i]["flipped"]] == swapped
    again = build_dataset(config("preference_folder", tmp_path, flip_labels=0.25))
    assert [i for i in range(8) if again[i]["pixel_values_w"].mean() < 0] == swapped
    clean = build_dataset(config("preference_folder", tmp_path))
    assert all(clean[i]["pixel_values_w"].mean() > clean[i]["pixel_values_l"].mean() for i in range(8))
    assert "flipped" not in clean[0]
    kto = build_dataset(config("labelled_folder", tmp_path, flip_labels=0.25))
    wrong = [i for i in range(16) if (kto[i]["label"] > 0) != (kto[i]["pixel_values"].mean() > 0)]
    assert len(wrong) == 4


def test_flip_labels_is_checked_before_loading():
    with pytest.raises(ValueError, match=r"data.flip_labels must be a fraction"):
        DataConfig(kind="preference_folder", path="x", flip_labels=1.5)
    with pytest.raises(ValueError, match=r"data.flip_labels applies to preference data.*'toy'"):
        DataConfig(kind="toy", flip_labels=0.2)


def test_make_preferences_draws_toy_prompts_by_name(tmp_path, monkeypatch):
    """`--prompts toy-heldin --num-prompts 2 --prompt-seed 1` ranks exactly toy_prompts('heldin', 2, seed=1),
    the same draw evaluate.py and make_pairs.py make from those flags."""
    import json

    from pipelines.toy.world import toy_prompts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mp = _script()
    out = tmp_path / "prefs"
    assert mp.main(["--model", "toy", "--prompts", "toy-heldin", "--num-prompts", "2", "--prompt-seed", "1",
                    "--out", str(out), "--samples", "2", "--steps", "1", "--reward", "toy_attribute_score"]) == 0
    records = [json.loads(mp.part_path(out, i).read_text()) for i in range(2)]
    assert [r["prompt"] for r in records] == toy_prompts("heldin", 2, seed=1)
    assert toy_prompts("heldin", 2, seed=1) != toy_prompts("heldin", 2, seed=0)  # the seed is really used


def test_resuming_with_other_options_is_one_error_before_anything_loads(tmp_path):
    """settings.json keeps what decides the part files; a re-run that changes --steps and --reward stops at
    once, naming both (the model "nowhere" would fail to load later, so the message proves the order), while
    --pairs may change."""
    mp = _script()
    base = ["--model", "nowhere", "--prompts", "toy-heldin", "--num-prompts", "2", "--out", str(tmp_path)]
    args = mp.parse_args(base)
    mp.write_settings(tmp_path, mp.check_settings(tmp_path, args))
    assert mp.check_settings(tmp_path, mp.parse_args([*base, "--pairs", "all"]))["steps"] == 25
    with pytest.raises(SystemExit, match=r"--reward 'toy_attributes' there, 'toy_clip' now; --steps 25 there, 8 now"):
        mp.main([*base, "--steps", "8", "--reward", "toy_clip"])


def test_correlated_noise_hand_example_and_its_correlation():
    """rho = 0.75: sqrt(.75) s + sqrt(.25) n = 0.866 s + 0.5 n; with s = 2, n = (1, -1): 2.232 and 1.232.
    Two samples share s and have their own unit-variance n, so each has variance .75 + .25 = 1 and their
    covariance is .75; over 200k draws the sample correlation is .75 within 0.01. rho = 0 is n itself."""
    mp = _script()
    got = mp.correlated_noise(torch.tensor([1.0, -1.0]), torch.tensor(2.0), 0.75)
    assert torch.allclose(got, torch.tensor([0.75 ** 0.5 * 2 + 0.5, 0.75 ** 0.5 * 2 - 0.5]))
    g = torch.Generator().manual_seed(0)
    shared, independent = torch.randn(200_000, generator=g), torch.randn(2, 200_000, generator=g)
    x = mp.correlated_noise(independent, shared, 0.75)
    assert abs(float(torch.corrcoef(x)[0, 1]) - 0.75) < 0.01 and abs(float(x.var()) - 1) < 0.02
    assert torch.equal(mp.correlated_noise(independent, shared, 0.0), independent)


def test_starting_noise_shares_one_draw_per_prompt_only_when_asked():
    """rho 0 gives the evaluation harness's per-seed noise; rho .75 gives samples correlated .75 with each other,
    the same again for the same seeds, and another shared draw for another prompt's seeds."""
    from trainers.method import initial_noise

    mp = _script()
    seeds, other = [11, 12, 13], [21, 22, 23]
    cpu = torch.device("cpu")
    assert torch.equal(mp.starting_noise((4, 64, 64), seeds, 0.0, cpu), initial_noise((4, 64, 64), seeds, cpu))
    x = mp.starting_noise((4, 64, 64), seeds, 0.75, cpu)
    assert torch.equal(x, mp.starting_noise((4, 64, 64), seeds, 0.75, cpu))
    assert abs(float(torch.corrcoef(x.flatten(1))[0, 1]) - 0.75) < 0.03
    y = mp.starting_noise((4, 64, 64), other, 0.75, cpu)
    assert abs(float(torch.corrcoef(torch.stack([x[0].flatten(), y[0].flatten()]))[0, 1])) < 0.03


@pytest.mark.parametrize("rho", ["1", "-0.1"])
def test_noise_correlation_outside_0_1_is_one_error(rho, capsys):
    mp = _script()
    with pytest.raises(SystemExit):
        mp.parse_args(["--model", "toy", "--prompts", "toy-heldin", "--out", "x", "--noise-correlation", rho])
    assert f"--noise-correlation must be in [0, 1) (1 would make every sample the same), got {float(rho)}" in \
        capsys.readouterr().err


def test_sets_from_before_noise_correlation_resume_as_independent(tmp_path):
    """A settings.json without the key was made with independent noises: it resumes with the default and
    refuses another correlation."""
    mp = _script()
    base = ["--model", "toy", "--prompts", "toy-heldin", "--out", str(tmp_path)]
    settings = mp.check_settings(tmp_path, mp.parse_args(base))
    del settings["noise_correlation"]
    mp.write_settings(tmp_path, settings)
    assert mp.check_settings(tmp_path, mp.parse_args(base))["noise_correlation"] == 0.0
    with pytest.raises(ValueError, match="--noise-correlation 0.0 there, 0.5 now"):
        mp.check_settings(tmp_path, mp.parse_args([*base, "--noise-correlation", "0.5"]))


def test_two_process_launch_shards_prompts_and_relabelling(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU: 4 prompts give each rank 2 of them
    (prompt i on rank i mod 2), for sampling and for relabelling. A launch whose ranks do not join one
    process group runs every prompt on each process as rank 0 of 1, and the two copies race on the files."""
    from pathlib import Path

    from distributed_launch import launch

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_preferences.py"
    out, relabelled = tmp_path / "two", tmp_path / "relabelled"
    done = launch([script, "--model", "toy", "--prompts", "toy-heldin", "--num-prompts", "4", "--samples", "2",
                   "--steps", "2", "--reward", "toy_clip", "--resolution", "32", "--out", out])
    assert {"rank 0 of 2: 2 new prompts", "rank 1 of 2: 2 new prompts"} <= set(done.stdout.splitlines())
    assert sorted(p.name for p in (out / "parts").iterdir()) == [f"{i:06d}.json" for i in range(4)]
    done = launch([script, "--relabel-from", out, "--reward", "toy_attribute_score", "--out", relabelled])
    assert {"rank 0 of 2: 2 prompts relabelled", "rank 1 of 2: 2 prompts relabelled"} <= set(done.stdout.splitlines())


def test_rank_lines_are_one_write_each(monkeypatch):
    """Ranks share one stdout and launchers run Python unbuffered, where print() writes the text and the
    newline separately, so two ranks' lines can run together ("...relabelledrank 1 of 2..."). say_line must
    hand the whole line, newline included, to a single write."""
    import sys

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    _script().say_line("rank 1 of 2: 2 prompts relabelled")
    assert out.writes == ["rank 1 of 2: 2 prompts relabelled\n"]


def test_reward_options_build_a_weighted_ranker_and_unknown_ones_fail_naming_the_accepted(tmp_path):
    """--reward-options is a YAML mapping handed to the reward's builder: a weighted ranker of the checker's
    graded score with a 0.001 x toy CLIP tie-break scores a real render 1 + 0.001 x CLIP, i.e. within
    0.001 x 100 = 0.1 of 1.0 (CLIP is 100 cos, |cos| <= 1). A mapping is required, and an option the
    builder does not take is one line naming the ones it does, before any model loads."""
    import numpy as np

    from pipelines.toy.attribute_training import render_batch
    from pipelines.toy.world import caption

    mp = _script()
    args = mp.parse_args(["--relabel-from", "x", "--out", "y", "--reward", "weighted", "--reward-options",
                          "{terms: {toy_attribute_score: 1.0, toy_clip: 0.001}}"])
    assert args.reward_options == {"terms": {"toy_attribute_score": 1.0, "toy_clip": 0.001}}
    ranker = mp.build_ranker(args.reward, args.reward_options, "cpu")
    images, specs = render_batch(np.random.default_rng(0), 2)
    score = ranker(images, [caption(spec) for spec in specs])
    assert score.shape == (2,) and ((score - 1.0).abs() <= 0.1).all()
    with pytest.raises(SystemExit):
        mp.parse_args(["--relabel-from", "x", "--out", "y", "--reward-options", "[1, 2]"])
    with pytest.raises(SystemExit, match=r"\['colour'\] not accepted by reward 'toy_clip'"):
        mp.build_ranker("toy_clip", {"colour": 1}, "cpu")
