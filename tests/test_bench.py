"""scripts/bench.py and its helpers, on CPU at toy size.

Every registered trainer gets the synthetic input its data contract asks for and runs a warm-up
step and a timed step through the real loop; the clock that times reference scripts counts the
optimizer steps of an unmodified accelerate script written here. No timing is asserted (speed
lives in docs/benchmarks.md), and nothing needs the network or a diffusers checkout.
"""
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]

import bench  # noqa: E402
import bench_clock  # noqa: E402
import bench_inputs  # noqa: E402
import bench_reference  # noqa: E402
from trainers import METHODS  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.batches import collate  # noqa: E402


class _Bundle:
    """What the synthetic inputs read from a bundle: the latent shape."""

    def latent_shape(self, n, size):
        return (n, 4, size[0] // 2, size[1] // 2)


# ------------------------------------------------------------------ synthetic inputs


def test_every_registered_method_has_a_synthetic_input():
    assert set(bench_inputs.METHOD_DATA) == set(METHODS)
    for overrides in bench_inputs.METHOD_DATA.values():
        kind = next(o.split("=", 1)[1] for o in overrides if o.startswith("data.kind="))
        assert kind in bench_inputs.SYNTHETIC


@pytest.mark.parametrize("kind, keys", [
    ("imagefolder", {"pixel_values"}),
    ("prompts", set()),
    ("preference_folder", {"pixel_values_w", "pixel_values_l"}),
    ("labelled_folder", {"pixel_values", "label"}),
    ("pairs", {"x_T", "x_0"}),
])
def test_synthetic_items_follow_the_data_contracts(kind, keys):
    ds = bench_inputs.synthetic_dataset(kind, 16, _Bundle())
    batch = collate([ds[0], ds[1]])
    assert set(batch) == keys | {"prompt", "skipped", "index"}
    assert batch["prompt"] == [ds[0]["prompt"], ds[1]["prompt"]] and batch["skipped"] == 0
    for key in keys & {"pixel_values", "pixel_values_w", "pixel_values_l"}:
        assert batch[key].shape == (2, 3, 16, 16) and batch[key].min() >= -1 and batch[key].max() <= 1
    if kind == "pairs":
        assert batch["x_T"].shape == batch["x_0"].shape == (2, 4, 8, 8)
    if kind == "labelled_folder":
        assert batch["label"].tolist() == [1.0, -1.0]
    assert all(torch.equal(ds[1][k], ds[1][k]) for k in keys)  # item i depends on i only


def test_unknown_inputs_are_named():
    with pytest.raises(ValueError, match="no synthetic input for method 'nope'"):
        bench_inputs.method_overrides("nope")
    with pytest.raises(ValueError, match="no synthetic stand-in for data.kind 'hf_disk'"):
        bench_inputs.synthetic_dataset("hf_disk", 16, _Bundle())


# ------------------------------------------------------------------ the harness, every method


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("bench_sd") / "pipe")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_runs_a_warmup_and_a_timed_step(method, tmp_path, tiny_sd):
    """The same path as the toy rows (`bench_one`), on the tiny SD architecture at 16 px to keep the suite fast."""
    extra = ["tbcm.route_steps=2"] if method == "tbcm" else []  # 3 teacher calls per prompt instead of 16
    args = bench.parse_args(["--batch", "2", "--warmup", "1", "--steps", "1", *extra])
    row = bench.bench_one(method, "tiny", str(tiny_sd), 16, args, tmp_path)
    assert row["steps_timed"] == 1 and row["method"] == method
    assert math.isfinite(row["median_step_s"]) and row["samples_per_s"] > 0 and row["step_TFLOP"] > 0
    assert row["trainable_params_M"] > 0
    assert sum(row["phases"].values()) == pytest.approx(1.0) and "backward" in row["phases"]


def test_cli_writes_markdown_and_json(tmp_path):
    out = tmp_path / "bench.md"
    assert bench.main(["--methods", "reflow", "--batch", "1", "--warmup", "1", "--steps", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| reflow | toy | 1 | fp32 |" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["steps_timed"] for r in report["rows"]] == [2] and report["comparisons"] == []


def test_a_combination_that_cannot_run_becomes_an_error_row():
    def fails(method, size):
        raise ValueError(f"{method} cannot train {size}\nsecond line")

    row = bench.guarded(fails, "lcd", "dit600m")
    assert row == {"method": "lcd", "size": "dit600m", "error": "could not run: ValueError: lcd cannot train dit600m"}
    assert "could not run: ValueError" in bench.markdown([row], "cpu", 1e12)
    assert "could not run: ValueError" in bench.comparison_markdown([row])


def test_a_method_without_a_reference_script_is_named(tmp_path):
    args = bench.parse_args(["--methods", "tbcm", "--reference-dir", str(tmp_path), "--reference-only"])
    rows, comparisons = bench.run_all(args, peak=1e12)
    assert rows == [] and len(comparisons) == 1
    assert comparisons[0]["error"].startswith("no reference: its baseline is in the suite")
    assert "| tbcm | toy | | | no reference:" in bench.comparison_markdown(comparisons)


# ------------------------------------------------------------------ the clock on an accelerate script

FAKE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    steps, done = int(sys.argv[1]), Path(sys.argv[2])
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for _ in range(steps):
        loss = model(torch.randn(2, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    done.write_text("finished")
""")


@pytest.fixture
def fake_script(tmp_path) -> Path:
    path = tmp_path / "train_fake.py"
    path.write_text(FAKE_SCRIPT)
    return path


def test_clock_stops_the_script_after_warmup_plus_steps(fake_script, tmp_path):
    before, argv = Accelerator.backward, list(sys.argv)
    result = bench_clock.time_script(fake_script, ["50", str(tmp_path / "done")], warmup=2, steps=3)
    assert len(result["step_times"]) == 3 and len(result["backward_times"]) == 3
    assert result["backward_calls"] == 6 and result["stopped_by_clock"]
    assert not (tmp_path / "done").exists()  # nothing after the loop ran
    assert Accelerator.backward is before and sys.argv == argv


def test_clock_reports_a_script_that_ends_first(fake_script, tmp_path):
    out = tmp_path / "times.json"
    code = bench_clock.main(["--warmup", "1", "--steps", "5", "--out", str(out), str(fake_script), "--", "4",
                             str(tmp_path / "done")])
    result = json.loads(out.read_text())
    assert code == 1 and not result["stopped_by_clock"] and (tmp_path / "done").read_text() == "finished"
    assert result["backward_calls"] == 4 and len(result["step_times"]) == 2


def test_run_reference_times_a_checkout_script_in_a_child_process(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "examples").mkdir(parents=True)
    (checkout / "examples" / "train_fake.py").write_text(FAKE_SCRIPT)
    ref = bench_reference.Reference({"toy": "examples/train_fake.py"}, lambda folder, resolution, n: str(folder),
                                    lambda data: [], lambda run: [str(run.iterations + 10), str(tmp_path / "done")])
    run = bench_reference.RefRun(model="unused", data="unused", resolution=32, batch=2, precision="no",
                                 iterations=4, output_dir=str(tmp_path / "out"), checkpointing=False)
    result = bench_reference.run_reference(checkout, ref, "toy", run, warmup=1, steps=2)
    assert len(result["step_times"]) == 2 and result["stopped_by_clock"]
    with pytest.raises(FileNotFoundError, match="must be a diffusers checkout"):
        bench_reference.run_reference(tmp_path / "elsewhere", ref, "toy", run, warmup=1, steps=2)
    with pytest.raises(ValueError, match="no reference script for size 'dit600m'; .* train toy"):
        bench_reference.run_reference(checkout, ref, "dit600m", run, warmup=1, steps=2)


# ------------------------------------------------------------------ the reference scripts' inputs


def test_reference_data_reads_back_through_our_data_kinds(tmp_path):
    from trainers.data import WebDatasetShards
    from trainers.preference_data import PickAPicPairs

    pattern = bench_reference.write_webdataset_shards(tmp_path / "wds", 16, 6)
    shards = WebDatasetShards(pattern, resolution=16)
    assert len(shards) == 6 and shards[0]["pixel_values"].shape == (3, 16, 16)
    assert sorted(shards[i]["prompt"] for i in range(6)) == sorted(f"a photo of object {i}" for i in range(6))
    pairs = PickAPicPairs(bench_reference.write_pickapic_parquet(tmp_path / "pick", 16, 4), keep_ties=True,
                          resolution=16)
    assert len(pairs) == 4 and pairs[1]["pixel_values_w"].shape == (3, 16, 16)


def test_reference_pipeline_gives_the_toy_teacher_77_token_prompts(tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel

    from pipelines.toy import TOY_TEACHER

    folder = bench_reference.reference_pipeline("toy", tmp_path / "pipe")
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    wide = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    toy = CLIPTextModel.from_pretrained(TOY_TEACHER, subfolder="text_encoder")
    ids = tokenizer(["", "a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert tokenizer.model_max_length == 77 and wide(ids)[0].shape == (2, 77, toy.config.hidden_size)
    short = tokenizer(["a red circle"], padding="max_length", max_length=24, return_tensors="pt").input_ids
    with torch.no_grad():  # the first 24 positions are the toy encoder's own
        assert torch.allclose(wide(short)[0], toy(short)[0], atol=1e-5)


@pytest.mark.parametrize("method", sorted(bench_reference.REFERENCES))
def test_our_side_of_each_comparison_resolves(method):
    ref = bench_reference.REFERENCES[method]
    cfg = load_config(None, [f"method={method}", "data.resolution=32", *ref.our_overrides("/data/somewhere")])
    assert cfg.data.path == "/data/somewhere" and cfg.data.kind in ("webdataset", "pickapic_with_ties")
    run = bench_reference.RefRun(model="/m", data="/d", resolution=32, batch=8, precision="no", iterations=3,
                                 output_dir="/o", checkpointing=False)
    argv = ref.argv(run)
    assert argv[argv.index("--train_batch_size") + 1] == "8" and argv[argv.index("--resolution") + 1] == "32"


def test_method_sections_on_the_command_line_reach_only_their_method():
    given = ["tbcm.route_steps=4", "fdistill.student_update_every=1", "train.seed=3", "optim.lr=1e-5"]
    assert bench.user_overrides("tbcm", given) == ["tbcm.route_steps=4", "train.seed=3", "optim.lr=1e-5"]
    assert bench.user_overrides("lcd", given) == ["train.seed=3", "optim.lr=1e-5"]


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_backward_flops_by_hand(groups):
    """A 3x3 convolution, 4 -> 4 channels, padding 1, on one 5x5 image: 100 outputs, each reading
    4 / groups input channels x 9 taps, so the forward is 2 * 100 * (36 / groups) FLOPs (7200 dense, 1800
    depthwise). Its backward computes grad_input and grad_weight, each as costly as the forward: 14400 and
    3600. torch's own formula ignores groups and says (C + 1) x 1800 = 9000 for the depthwise case."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    fixed = {torch.ops.aten.convolution_backward: bench.conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
        conv(x).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    forward = 2 * 100 * 36 // groups
    assert counts["aten.convolution"] == forward
    assert counts["aten.convolution_backward"] == 2 * forward


def test_transposed_conv_backward_flops_by_hand():
    """A 2x2 stride-2 transposed convolution 3 -> 2 channels on a 4x4 input: each of the 48 input elements
    scatters into 2 channels x 4 taps, 2 * 16 * 3 * 8 = 768 FLOPs forward; weights only (the input needs no
    gradient) cost the same again."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.ConvTranspose2d(3, 2, 2, stride=2, bias=False)
    fixed = {torch.ops.aten.convolution_backward: bench.conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
        conv(torch.randn(1, 3, 4, 4)).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.convolution"] == 768 and counts["aten.convolution_backward"] == 768
