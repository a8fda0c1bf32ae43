"""Evaluation harness and CLI: prompt files, seeding and sharding, toy FID reference, report files,
1 vs 2 process generation, early one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import harness, prompts as pr, report
from evaluation.scoring import ScoringOptions, build_scoring, toy_reference_images
from distributed_launch import two_process_launcher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "evaluate.py")


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _run(args, launcher=(sys.executable,), timeout=300):
    return subprocess.run([*launcher, SCRIPT, *map(str, args)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _main(args, capsys):
    """scripts/evaluate.py's main in this process (the script only does sys.exit(main())): exit code, stderr."""
    import evaluate  # scripts/ is on the path (conftest); no package of that name is installed

    code = evaluate.main([str(a) for a in args])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- fixtures: tiny pipelines and a tiny CLIP

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from pipelines.tiny import clip_tokenizer, save_tiny_pipeline
    root = tmp_path_factory.mktemp("eval_assets")
    save_tiny_pipeline("sd", root / "sd_a", seed=0)
    save_tiny_pipeline("sd", root / "sd_b", seed=1)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root


COMMON = ["--prompts", "toy-heldout", "--num-prompts", 2, "--num-images", 2, "--batch-size", 2, "--seed", 5]


@pytest.fixture(scope="module")
def two_model_run(assets):
    """1 process: two models x steps 1,2, every toy metric, images saved."""
    out = assets / "run1"
    done = _run(["--model", assets / "sd_a", "--model", assets / "sd_b", "--steps", "1,2", *COMMON,
                 "--metrics", "fid,clip_score,diversity,vendi,toy_attributes,speed", "--speed-warmup", 0,
                 "--speed-repeats", 1, "--feature-model", assets / "clip", "--clip-model", assets / "clip",
                 "--save-images", "--out", out])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ---------------------------------------------------------------- prompt sets

def test_prompt_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x", "category": "c1"}\n{"prompt": "y"}\n')
    (tmp_path / "meta_data.json").write_text(json.dumps({"id1": {"prompt": "p1", "category": "animals"},
                                                         "id2": {"prompt": "p2", "category": "people"}}))
    (tmp_path / "c.tsv").write_text("Prompt\tCategory\tChallenge\nfirst\tArts\tBasic\nsecond\tFood\tBasic\n")
    assert pr.read_prompt_file(tmp_path / "a.txt").prompts == ["a cat", "a dog"]
    b = pr.read_prompt_file(tmp_path / "b.jsonl")
    assert (b.prompts, b.categories) == (["x", "y"], ["c1", "b"])  # missing category -> file stem
    m = pr.read_prompt_file(tmp_path / "meta_data.json")
    assert (m.prompts, m.categories) == (["p1", "p2"], ["animals", "people"])
    assert pr.read_prompt_file(tmp_path / "c.tsv").prompts == ["first", "second"]
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="no 'prompt' field"):
        pr.read_prompt_file(tmp_path / "bad.csv")


def test_benchmarks_read_from_root_file_or_folder(tmp_path, monkeypatch):
    (tmp_path / "hpsv2").mkdir()
    (tmp_path / "hpsv2" / "anime.json").write_text(json.dumps(["a1", "a2"]))
    (tmp_path / "hpsv2" / "photo.json").write_text(json.dumps(["p1"]))
    (tmp_path / "coco-30k.txt").write_text("c1\nc2\nc3\n")
    monkeypatch.setenv(pr.ROOT_ENV, str(tmp_path))
    h = pr.load_prompts("hpsv2")
    assert (h.prompts, h.categories) == (["a1", "a2", "p1"], ["anime", "anime", "photo"])
    assert pr.load_prompts("coco-30k", n=2).prompts == ["c1", "c2"]
    with pytest.raises(FileNotFoundError, match="parti.txt"):
        pr.load_prompts("parti")


def test_toy_prompt_sets_are_deterministic_and_split():
    from pipelines.toy.world import is_heldout, parse_caption
    a, b = pr.load_prompts("toy-heldout", n=5), pr.load_prompts("toy-heldout", n=5)
    assert a.prompts == b.prompts and len(set(a.prompts)) == 5
    assert all(any(is_heldout(o) for o in parse_caption(p).objects) for p in a.prompts)
    assert not any(is_heldout(o) for p in pr.load_prompts("toy-heldin", n=5).prompts for o in parse_caption(p).objects)


def test_prompts_excluding_an_evaluation_set_are_disjoint_and_keep_the_draw_order(tmp_path):
    """A draw of the held-out split with seed 1 repeats many of the fixed 64-prompt held-out evaluation
    captions (the caption space of one-object held-out scenes is small), so the training list must drop
    them. Kept prompts stay in draw order: the raw draw filtered, cut to n."""
    evaluation = set(pr.load_prompts("toy-heldout").prompts)
    raw = pr.load_prompts("toy-heldout", n=300, seed=1).prompts
    assert evaluation & set(raw[:236])  # without exclusion the lists overlap: the test would be vacuous otherwise
    kept = pr.load_prompts_excluding("toy-heldout", "toy-heldout", n=200, seed=1).prompts
    assert len(kept) == 200 and not evaluation & set(kept)
    assert kept == [p for p in raw if p not in evaluation][:200]
    (tmp_path / "few.txt").write_text("a\nb\nc\n")
    (tmp_path / "ban.txt").write_text("b\n")
    assert pr.load_prompts_excluding(str(tmp_path / "few.txt"), str(tmp_path / "ban.txt"), n=2).prompts == ["a", "c"]
    with pytest.raises(ValueError, match="only 2 prompts"):
        pr.load_prompts_excluding(str(tmp_path / "few.txt"), str(tmp_path / "ban.txt"), n=3)


def test_write_prompts_cli_writes_the_excluding_list(tmp_path):
    out = tmp_path / "train.txt"
    script = str(ROOT / "scripts" / "write_prompts.py")
    done = subprocess.run([sys.executable, script, "--prompts", "toy-heldout", "--num-prompts", "50", "--prompt-seed",
                           "1", "--exclude", "toy-heldout", "--out", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines() == pr.load_prompts_excluding("toy-heldout", "toy-heldout", n=50, seed=1).prompts
    bad = subprocess.run([sys.executable, script, "--prompts", "toy-heldout", "--num-prompts", "5", "--out",
                          str(tmp_path / "x.json")], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--out must be a .txt file" in bad.stderr


def test_write_prompts_mixes_sets_in_order(tmp_path):
    out = tmp_path / "mixed.txt"
    script = str(ROOT / "scripts" / "write_prompts.py")

    def write(*args):
        return subprocess.run([sys.executable, script, *args, "--prompt-seed", "1", "--out", str(out)], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=120)
    done = write("--prompts", "toy-heldout", "--exclude", "toy-heldout", "--num-prompts", "4",
                 "--prompts", "toy-heldin", "--exclude", "toy-heldin", "--num-prompts", "3")
    assert done.returncode == 0, done.stderr
    expected = (pr.load_prompts_excluding("toy-heldout", "toy-heldout", n=4, seed=1).prompts
                + pr.load_prompts_excluding("toy-heldin", "toy-heldin", n=3, seed=1).prompts)
    assert out.read_text().splitlines() == expected
    bad = write("--prompts", "toy-heldout", "--prompts", "toy-heldin", "--num-prompts", "1", "--num-prompts", "2",
                "--num-prompts", "3")
    assert bad.returncode != 0 and "--num-prompts given 3 times for 2 --prompts" in bad.stderr


# ---------------------------------------------------------------- seeding, sharding, in-training evaluation

def test_shards_partition_global_batches():
    world = 3
    shards = [harness.shard_batches(10, 3, r, world) for r in range(world)]
    assert shards[0] == [[0, 1, 2], [9]] and shards[1] == [[3, 4, 5]] and shards[2] == [[6, 7, 8]]
    flat = sorted(i for s in shards for b in s for i in b)
    assert flat == list(range(10))


def _render_sampler(calls=None, scale=1.0):
    """Real toy renders of the prompts (layout jitter from the seed), optionally darkened."""
    def sample(prompts, seeds):
        if calls is not None:
            calls.append((list(prompts), list(seeds)))
        return torch.stack(list(toy_reference_images(prompts, seeds, 32))) * scale
    return sample


def test_seed_rule_and_toy_fid_reference(assets):
    """Image k of prompt p gets seed S + p*K + k. A sampler that returns exactly the toy reference renders
    has FID ~0 (same features, same statistics) and passes the attribute checker; darkening the images
    moves their features, so FID grows."""
    prompts = pr.load_prompts("toy-heldin", n=6).prompts
    options = ScoringOptions(feature_model=str(assets / "clip"), clip_model=str(assets / "clip"))
    scoring = build_scoring(["fid", "toy_attributes", "clip_score", "vendi"], prompts, images_per_prompt=2,
                            options=options)
    calls = []
    same = harness.evaluate_in_training(_render_sampler(calls), prompts, scoring, seed=100, images_per_prompt=2,
                                        batch_size=5)
    assert [len(p) for p, _ in calls] == [5, 5, 2]
    seeds = [s for _, ss in calls for s in ss]
    assert seeds == list(range(100, 112))
    assert [p for ps, _ in calls for p in ps] == [prompts[i // 2] for i in range(12)]
    assert abs(same["fid"]) < 1e-6 and same["toy_attributes"] == 1.0
    assert set(same) == {"fid", "toy_attributes", "clip_score", "vendi"}
    dark = harness.evaluate_in_training(_render_sampler(scale=0.5), prompts, scoring, seed=100,
                                        images_per_prompt=2, batch_size=5)
    assert dark["fid"] > 1e-3 + same["fid"]


def test_reward_metrics_are_the_rewards_mean_with_their_options(assets):
    """`reward:<name>` scores every image with that reward, built with its `reward_options`, and reports the
    mean: the toy CLIP reward built from the test's tiny CLIP (an option) equals that module's own mean
    on the same images; real renders pass the exact checker, so reward:toy_attributes is 1.0."""
    import shutil

    from pipelines.toy import TOY_CLIP
    from rewards import build_reward
    clip = assets / "clip_with_processor"
    if not clip.exists():
        shutil.copytree(assets / "clip", clip)
        shutil.copy(TOY_CLIP / "processor_config.json", clip)  # 32 px, CLIP mean/std: the reward's preprocessing
    prompts = pr.load_prompts("toy-heldin", n=3).prompts
    options = ScoringOptions(reward_options={"toy_clip": {"path": str(clip)}})
    scoring = build_scoring(["reward:toy_clip", "reward:toy_attributes"], prompts, images_per_prompt=2,
                            options=options)
    got = harness.evaluate_in_training(_render_sampler(), prompts, scoring, seed=7, images_per_prompt=2,
                                       batch_size=4)
    images = _render_sampler()([p for p in prompts for _ in range(2)], list(range(7, 13)))
    direct = build_reward("toy_clip", path=str(clip))(images, [p for p in prompts for _ in range(2)])
    assert got["reward:toy_clip"] == pytest.approx(float(direct.double().mean()), abs=1e-5)
    shipped = build_reward("toy_clip")(images, [p for p in prompts for _ in range(2)])
    assert abs(float(shipped.mean()) - got["reward:toy_clip"]) > 1e-3  # the option was used, not the default
    assert got["reward:toy_attributes"] == 1.0


def test_in_training_eval_passes_weights_options_through(assets):
    """eval.clip_model / eval.reward_options reach the metric builders: a missing folder or file named there
    fails while the evaluation is built (before step 0), naming the recipe key or the path."""
    from types import SimpleNamespace

    from trainers.config import load_config
    from trainers.evaluating import InTrainingEval
    acc = SimpleNamespace(device=torch.device("cpu"))
    cfg = load_config(None, ["eval.metrics=[clip_score]", f"eval.clip_model={assets / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="eval.clip_model"):
        InTrainingEval(cfg, None, acc)
    cfg = load_config(None, ["eval.metrics=[reward:hpsv2]", "eval.reward_options={hpsv2: {path: /nowhere/hps.pt}}"])
    with pytest.raises(Exception, match="/nowhere/hps.pt"):
        InTrainingEval(cfg, None, acc)
    cfg = load_config(None, ["eval.metrics=[clip_score]", f"eval.clip_model={assets / 'clip'}"])
    assert InTrainingEval(cfg, None, acc).scoring.metrics[0].protocol["model"].startswith(str(assets / "clip") + "@")


def test_metric_setup_errors_are_early_and_named(assets):
    prompts = pr.load_prompts("toy-heldin", n=2).prompts
    with pytest.raises(ValueError, match="--num-images 2"):
        build_scoring(["vendi"], prompts, images_per_prompt=1, options=ScoringOptions(feature_model=str(assets / "clip")))
    with pytest.raises(ValueError, match="toy_attributes judges toy-world captions"):
        build_scoring(["toy_attributes"], ["a photo of a cat"], images_per_prompt=1)
    with pytest.raises(ValueError, match="needs --fid-ref"):
        build_scoring(["fid"], ["a photo of a cat"], images_per_prompt=1,
                      options=ScoringOptions(feature_model=str(assets / "clip")))
    with pytest.raises(ValueError, match="unknown metric 'fidd'"):
        build_scoring(["fidd"], prompts, images_per_prompt=1)


# ---------------------------------------------------------------- CLI: report files, plot, 2 processes, errors

def test_cli_report_files_exist_and_parse(two_model_run):
    doc = report.read_eval(two_model_run / "eval.json")
    assert [(e["label"], e["steps"]) for e in doc["results"]] == [("sd_a", 1), ("sd_a", 2), ("sd_b", 1), ("sd_b", 2)]
    p = doc["protocol"]
    assert p["prompts"]["name"] == "toy-heldout" and p["prompts"]["count"] == 2
    assert (p["images_per_prompt"], p["seed"], p["batch_size"]) == (2, 5, 2) and "seed_rule" in p
    for e in doc["results"]:
        assert e["resolution"] == [32, 32] and e["sample_count"] == 4
        fid = e["metrics"]["fid"]["fid"]
        assert np.isfinite(fid["value"])
        for key in ("prompts", "seed", "steps", "guidance", "resolution", "sample_count", "extractor", "resize",
                    "reference"):
            assert key in fid["protocol"], key
        assert set(report.numbers(e)) == {"fid", "clip_score", "diversity", "vendi", "toy_attributes",
                                          "latency_s_per_image", "images_per_s"}
        grid = Image.open(two_model_run / e["grid"])
        assert grid.size == (2 + 2 * 34, 2 + 2 * 34)  # 2 prompts x 2 images of 32 px, 2 px padding
    table = (two_model_run / "eval.md").read_text()
    assert table.count("| sd_a |") == 2 and table.count("| sd_b |") == 2 and "| fid |" in table
    assert Image.open(two_model_run / "metrics_vs_steps.png").size[0] > 100


def test_plot_has_one_line_per_model(two_model_run):
    doc = report.read_eval(two_model_run / "eval.json")
    fig = report.plot_metrics(doc)
    assert len(fig.axes) == 7
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1, 2], [1, 2]]
    series = report.plot_series(doc)["fid"]
    assert set(series) == {"sd_a", "sd_b"}


def test_two_processes_give_the_same_images_and_numbers(assets, two_model_run):
    """Batches are formed globally and each keeps its seeds, so process 0 running batch 0 and process 1
    running batch 1 reproduces the 1-process run exactly; different seeds do give different images."""
    out = assets / "run2"
    done = _run(["--model", assets / "sd_a", "--steps", "2", *COMMON, "--metrics", "fid,clip_score",
                 "--feature-model", assets / "clip", "--clip-model", assets / "clip", "--save-images", "--out", out],
                launcher=two_process_launcher())
    assert done.returncode == 0, done.stderr[-3000:]
    doc = report.read_eval(out / "eval.json")
    assert doc["protocol"]["extra"]["processes"] == 2
    files = sorted((out / "images" / "sd_a" / "steps2").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(4)]
    one = [np.asarray(Image.open(two_model_run / "images" / "sd_a" / "steps2" / f.name)) for f in files]
    two = [np.asarray(Image.open(f)) for f in files]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(one[0], one[1]) and one[0].std() > 5
    single = report.numbers(report.read_eval(two_model_run / "eval.json")["results"][1])
    for key, value in report.numbers(doc["results"][0]).items():
        assert value == pytest.approx(single[key], rel=1e-6, abs=1e-9), key


def test_missing_weights_fail_in_one_line_before_generation(assets, tmp_path, capsys):
    empty = tmp_path / "weights"
    empty.mkdir()
    code, err = _main(["--model", assets / "sd_a", "--steps", "1", "--prompts", "toy-heldout", "--metrics", "fid",
                       "--feature-model", "inception", "--inception-weights", empty, "--out", tmp_path / "out"],
                      capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "weights-inception-2015-12-05-6726825d.pth" in lines[0] and str(empty) in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_prompt_set_lists_valid_names(assets, tmp_path, capsys):
    code, err = _main(["--model", assets / "sd_a", "--steps", "1", "--prompts", "coco30k", "--out", tmp_path / "out"],
                      capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "unknown prompt set 'coco30k'" in line
    assert all(name in line for name in pr.PROMPT_SETS)


def test_uniform_flow_grid_makes_two_real_steps_where_diffusers_default_makes_one():
    """diffusers' flow Euler grid at N = 2 is [1, 0.001, 0]: the second step moves x by 0.001 v, so the
    2-step image is the 1-step image to within that; the uniform grid [1, 0.5, 0] is a real second step.
    VP pipelines get no extra arguments, and an unknown grid name is an error."""
    from evaluation.harness import flow_grid_kwargs, load_pipeline, pipeline_sampler

    pipe = load_pipeline("toy-flow", torch.float32, "cpu")
    assert flow_grid_kwargs(pipe, 2, "uniform") == {"sigmas": [1.0, 0.5]}
    assert flow_grid_kwargs(pipe, 4, "diffusers") == {}
    prompt = ["a large red circle at the center on a blue background"]

    def image(steps, grid):
        return pipeline_sampler(pipe, steps, 5.0, 32, 32, **flow_grid_kwargs(pipe, steps, grid))(prompt, [0])

    one, default_two, uniform_two = image(1, "diffusers"), image(2, "diffusers"), image(2, "uniform")
    assert (default_two - one).abs().max() < 0.02
    assert (uniform_two - one).abs().max() > 0.2
    vp = load_pipeline("toy", torch.float32, "cpu")
    assert flow_grid_kwargs(vp, 2, "uniform") == {}
    with pytest.raises(ValueError, match="flow grid 'even'"):
        flow_grid_kwargs(vp, 2, "even")


def test_win_rate_hand_example():
    """Prompt 0: scores (3 vs 1) win, (2 vs 2) tie -> outcomes 1, 0.5; prompt 1: (0 vs 5) loss, (4 vs 4) tie
    -> 0, 0.5. Win rate = (1 + .5 + 0 + .5) / 4 = 0.5; ties 2/4; per-prompt means 0.75 and 0.25, whose
    sample std is sqrt(((.25)^2 + (.25)^2) / 1) = 0.3536, so se = 0.3536 / sqrt(2) = 0.25."""
    from evaluation.win_rate import win_rate

    got = win_rate(torch.tensor([3.0, 2.0, 0.0, 4.0]), torch.tensor([1.0, 2.0, 5.0, 4.0]), [0, 0, 1, 1])
    assert got == pytest.approx({"win_rate": 0.5, "win_rate_se": 0.25, "ties": 0.5})
    assert win_rate(torch.ones(3), torch.zeros(3), [0, 1, 2])["win_rate"] == 1.0
    with pytest.raises(ValueError, match="two \\[N\\] score columns"):
        win_rate(torch.ones(3), torch.zeros(2), [0, 1, 2])


def test_baseline_win_rates_pair_images_by_seed(assets, tmp_path, capsys):
    """The same model under two labels makes the same image from each seed: every comparison is a tie, so
    the win rate is exactly 1/2 for every score column; bad --baseline uses fail before generation."""
    out = tmp_path / "wr"
    code, err = _main(["--model", assets / "sd_a", "--model", assets / "sd_a", "--label", "base", "--label", "same",
                       "--steps", "1", *COMMON, "--metrics", "clip_score,toy_attributes", "--clip-model",
                       assets / "clip", "--baseline", "base", "--out", out], capsys)
    assert code == 0, err[-3000:]
    base, same = report.read_eval(out / "eval.json")["results"]
    assert "win_rate" not in base["metrics"]
    got = report.numbers(same)
    for column in ("clip_score", "toy_attributes"):
        assert got[f"win_rate:{column}"] == 0.5 and got[f"ties:{column}"] == 1.0
    assert same["metrics"]["win_rate"]["win_rate:clip_score"]["protocol"]["baseline"] == "base"
    for bad, message in ((["--baseline", "nope"], "not one of the model labels"),
                         (["--baseline", "base", "--metrics", "fid"], "compares per-image scores")):
        code, err = _main(["--model", assets / "sd_a", "--label", "base", "--steps", "1", *COMMON, *bad,
                           "--feature-model", assets / "clip", "--out", tmp_path / "bad"], capsys)
        assert code == 2 and message in err.strip().splitlines()[-1], err[-2000:]


def test_generate_writes_images_grid_and_the_seed_rule(assets, tmp_path):
    """scripts/generate.py: image k of prompt p has seed S + p*K + k, so prompt 1 generated alone from seed
    S + K gives the same pixels; the files, grid and jsonl records are all written."""
    import generate
    from PIL import Image

    common = ["--model", str(assets / "sd_a"), "--num-images", "2", "--steps", "2", "--guidance", "3",
              "--batch-size", "3"]
    assert generate.main([*common, "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "10",
                          "--out", str(tmp_path / "both")]) == 0
    assert generate.main([*common, "--prompt", "a blue square", "--seed", "12", "--out", str(tmp_path / "one")]) == 0
    records = [json.loads(line) for line in (tmp_path / "both" / "images.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"]) for r in records] == [("0000_00.png", 10), ("0000_01.png", 11),
                                                         ("0001_00.png", 12), ("0001_01.png", 13)]
    for k in range(2):
        a = np.asarray(Image.open(tmp_path / "both" / f"0001_{k:02d}.png"))
        b = np.asarray(Image.open(tmp_path / "one" / f"0000_{k:02d}.png"))
        assert np.array_equal(a, b)
    first = np.asarray(Image.open(tmp_path / "both" / "0000_00.png"))
    assert not np.array_equal(first, np.asarray(Image.open(tmp_path / "both" / "0000_01.png")))
    assert Image.open(tmp_path / "both" / "grid.png").size[0] > first.shape[1] * 2  # two images per row
