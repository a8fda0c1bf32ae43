"""make_pairs: the seed rule, cached text, 2 processes = 1 process, resume after a kill, the first-order error."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.pairs import PairsDataset, first_order_error
from distributed_launch import launch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    # 3 prompts x 2 = 6 pairs in 3 shards of 2: with 2 processes, rank 0 makes shards 0 and 2, rank 1 shard 1.
    return ["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--pairs-per-prompt", "2",
            "--steps", "2", "--guidance", "2.0", "--resolution", "16", "--batch-size", "2", "--shard-size", "2",
            *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    tmp = tmp_path_factory.mktemp("pairs")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return save_tiny_pipeline("sd", tmp / "sd"), tmp / "prompts.txt", tmp


@pytest.fixture(scope="module")
def reference(setup):
    import make_pairs

    model, prompts, tmp = setup
    assert make_pairs.main(args(model, prompts, tmp / "one")) == 0
    return tmp / "one"


def shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "index.json").read_text())
    out = {}
    for entry in index["shards"]:
        out.update({f"{entry['file']}:{k}": v for k, v in load_file(folder / entry["file"]).items()})
    return out


def test_first_order_error_by_hand():
    """Two grid points, final sample x_0 = [0, 0] per sample.
    Sample 0: x0_hat_1 = [1, 1] -> mean sq 1; x0_hat_2 = [0, 0] -> 0. Mean 0.5, first 1.
    Sample 1: x0_hat_1 = [2, 0] -> 4/2 = 2; x0_hat_2 = [0, 1] -> 1/2. Mean 1.25, first 2.
    A first-order trajectory (every x0_hat equal to x_0) scores exactly 0."""
    x_0 = torch.zeros(2, 2)
    hats = [torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    mean, first = first_order_error(hats, x_0)
    torch.testing.assert_close(mean, torch.tensor([0.5, 1.25]))
    torch.testing.assert_close(first, torch.tensor([1.0, 2.0]))
    assert first_order_error([x_0, x_0], x_0)[0].abs().max() == 0


def test_pairs_follow_the_seed_rule_and_cache_text(setup, reference):
    """Pair i has prompt i // 2 and noise from a CPU generator seeded 0 + i; cached cond = encode_prompt."""
    from pipelines.backbones import load_bundle
    from trainers.method import initial_noise

    ds = PairsDataset(str(reference))
    assert len(ds) == 6 and [ds[i]["prompt"] for i in range(6)] == [p for p in PROMPTS for _ in range(2)]
    for i in (0, 5):
        torch.testing.assert_close(ds[i]["x_T"], initial_noise((4, 4, 4), [i], torch.device("cpu"))[0], rtol=0, atol=0)
        assert ds[i]["x_0"].shape == (4, 4, 4) and torch.isfinite(ds[i]["x_0"]).all()
    bundle = load_bundle(str(setup[0]))
    cond = bundle.encode_prompt([ds[3]["prompt"]], image_size=(16, 16)).kwargs["encoder_hidden_states"][0]
    torch.testing.assert_close(ds[3]["cond"]["encoder_hidden_states"], cond)
    index = json.loads((reference / "index.json").read_text())
    assert 0 < index["first_order_error"] < index["one_step_error"]  # 2 steps: the last point's error is 0


def test_two_processes_make_the_same_pairs_as_one(setup, reference):
    model, prompts, tmp = setup
    launch([ROOT / "scripts" / "make_pairs.py", *args(model, prompts, tmp / "two")])
    one, two = shard_tensors(reference), shard_tensors(tmp / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one), "pairs depend on the process count"
    assert json.loads((reference / "index.json").read_text()) == json.loads((tmp / "two" / "index.json").read_text())


def test_killed_run_resumes_without_duplicates_or_gaps(setup, reference, monkeypatch):
    """The run dies while writing shard 1 (its partial file is on disk, as a SIGKILL there leaves it);
    re-running the same command makes the missing shards only, and the result equals an unbroken run."""
    import make_pairs
    import trainers.pairs as pairs

    model, prompts, tmp = setup
    out = tmp / "killed"
    real_write, written = pairs.write_atomic, []

    def dying_write(tensors, path):
        if len(written) == 1:
            from safetensors.torch import save_file

            save_file(tensors, str(path.with_name(path.name + ".partial")))
            raise SystemExit("killed")
        written.append(path.name)
        real_write(tensors, path)

    monkeypatch.setattr(pairs, "write_atomic", dying_write)
    with pytest.raises(SystemExit):
        make_pairs.main(args(model, prompts, out))
    assert sorted(p.name for p in out.glob("pairs-*")) == ["pairs-00000.safetensors", "pairs-00001.safetensors.partial"]
    assert not (out / "index.json").exists()
    monkeypatch.setattr(pairs, "write_atomic", lambda t, p: (written.append(p.name), real_write(t, p)))
    assert make_pairs.main(args(model, prompts, out)) == 0
    assert written == ["pairs-00000.safetensors", "pairs-00001.safetensors", "pairs-00002.safetensors"]
    assert not list(out.glob("*.partial"))
    resumed, unbroken = shard_tensors(out), shard_tensors(reference)
    assert torch.equal(torch.cat([v for k, v in resumed.items() if k.endswith("pair_index")]), torch.arange(6))
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)


def test_other_settings_are_refused_on_resume(setup, reference):
    import make_pairs

    model, prompts, _ = setup
    with pytest.raises(ValueError, match=r"other settings \(steps: 2 there, 3 now\)"):
        make_pairs.main(args(model, prompts, reference, "--steps", "3"))


def test_measure_only_reports_the_pairs_first_order_error(setup, reference):
    """The same items and ODE measured without writing pairs give the numbers the index summarises."""
    import make_pairs

    model, prompts, tmp = setup
    assert make_pairs.main(args(model, prompts, tmp / "measure", "--measure-only")) == 0
    measured = json.loads((tmp / "measure" / "first_order.json").read_text())
    index = json.loads((reference / "index.json").read_text())
    assert measured["count"] == 6 and not list((tmp / "measure").glob("pairs-*"))
    for key in ("first_order_error", "one_step_error"):
        assert measured[key] == pytest.approx(index[key], rel=1e-5)
