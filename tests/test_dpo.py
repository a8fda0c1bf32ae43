"""Smoke tier for trainers/dpo.py on a tiny SD pipeline and a tiny preference folder (16 px).

In-process runs of the real loop check, for every loss, that the policy trains while the
reference, VAE and text encoder stay put; LoRA uses the policy with adapters off as reference;
a resumed run equals an unbroken one bitwise. One CLI run checks 2-process DDP end to end.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainers.config import resolve
from distributed_launch import assert_ranks_identical, launch_training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefs")
    rng = np.random.default_rng(0)
    with open(folder / "preferences.jsonl", "w") as fh:
        for i in range(4):
            for side in ("w", "l"):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{side}{i}.png")
            fh.write(json.dumps({"prompt": f"picture {i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"}) + "\n")
    return folder


def tree(tiny_sd, prefs, out, loss="dpo", lora=0, **dpo) -> dict:
    kind = "labelled_folder" if loss == "kto" else "preference_folder"
    return {"method": "dpo", "output_dir": str(out), "model": {"source": str(tiny_sd), "lora": {"rank": lora}},
            "data": {"kind": kind, "path": str(prefs), "resolution": 16},
            "train": {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0, "log_every": 1, "log_with": "none",
                      "max_grad_norm": 0.0},
            "optim": {"lr": 1e-3, "weight_decay": 0.0}, "export": {"enabled": False},
            "dpo": {"loss": loss, "beta": 50.0, "sample_steps": 2, **dpo}}


def build(t: dict):
    from trainers.data import build_dataset
    from trainers.dpo import DPO
    from trainers.run import load_run_bundle

    cfg = resolve(t, "<test>")
    torch.manual_seed(cfg.train.seed)
    bundle = load_run_bundle(cfg, torch.device("cpu"))
    return cfg, build_dataset(cfg.data), DPO(cfg, bundle)


def run_loop(cfg, dataset, method):
    from accelerate import Accelerator

    from trainers.loop import train

    return train(cfg, Accelerator(cpu=True), method, dataset)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> set[str]:
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


CASES = {
    "dpo": {}, "kto": {}, "mapo": {}, "simpo": {}, "dspo": {"dspo": {"weight": 0.5}},
    "adaptive": {"adaptive": {"draws": 2}}, "dpo+pixel": {"pixel": {"weight": 1.0}},
    "simpo+pixel": {"pixel": {"weight": 1.0, "beta": 10.0}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_loss_trains_the_policy_and_nothing_else(case, tiny_sd, prefs, tmp_path):
    loss = case.split("+")[0]
    cfg, dataset, method = build(tree(tiny_sd, prefs, tmp_path, loss, **CASES[case]))
    bundle = method.bundle
    frozen = {"vae": snapshot(bundle.vae), "text": snapshot(bundle.text_encoders[0])}
    policy_before = snapshot(method.policy)
    if loss in ("mapo", "simpo"):
        assert method.reference is None and method.reference_mode == "none"
    else:
        reference_before = snapshot(method.reference)
    run_loop(cfg, dataset, method)
    assert changed(policy_before, method.policy), "the policy did not train"
    assert not changed(frozen["vae"], bundle.vae) and not changed(frozen["text"], bundle.text_encoders[0])
    if method.reference is not None:
        assert not changed(reference_before, method.reference), "the reference moved"
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and all(np.isfinite(m["loss"]) for m in metrics)
    assert "implicit_acc" in metrics[0]
    if loss not in ("mapo", "simpo"):
        assert "model_minus_ref_w" in metrics[0] or "model_minus_ref" in metrics[0]
    if "pixel" in case:
        assert "pixel/implicit_acc" in metrics[0]


def test_flipped_labels_split_the_logs(tiny_sd, prefs, tmp_path):
    """With data.flip_labels 0.5, round(0.5 * 4) = 2 of the 4 pairs are swapped; a batch of all 4 logs
    implicit accuracy and Adaptive-DPO's weight for both groups, the weight within (0, 1]."""
    t = tree(tiny_sd, prefs, tmp_path, "adaptive", adaptive={"draws": 2})
    t["data"]["flip_labels"] = 0.5
    t["train"]["batch_size"] = 4
    cfg, dataset, method = build(t)
    assert sum(dataset[i]["flipped"] for i in range(4)) == 2
    run_loop(cfg, dataset, method)
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for group in ("flipped", "clean"):
        assert 0.0 <= metrics[f"{group}/implicit_acc"] <= 1.0
        assert 0.0 < metrics[f"{group}/adaptive_weight"] <= 1.0
        assert f"{group}/adaptive_margin" in metrics and f"{group}/adaptive_metric" in metrics


def test_lora_reference_is_the_policy_with_adapters_off(tiny_sd, prefs, tmp_path):
    from pipelines.backbones import load_bundle

    cfg, dataset, method = build(tree(tiny_sd, prefs, tmp_path, "dpo", lora=4))
    assert method.reference_mode == "adapters_off" and method.reference is None
    base = load_bundle(str(tiny_sd)).denoiser.eval()
    before = snapshot(method.policy)
    run_loop(cfg, dataset, method)
    moved = changed(before, method.policy)
    assert moved and all("lora_" in k for k in moved), f"non-LoRA weights moved: {sorted(moved)[:3]}"
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([10.0, 500.0])
    cond = method.bundle.encode_prompt(["a", "b"], image_size=(16, 16))
    method.policy.eval()
    reference = method._reference_output(x_t, t, cond)
    with torch.no_grad():
        torch.testing.assert_close(reference, method.bundle.predict(base, x_t, t, cond).float())
        policy = method.bundle.predict(method.policy, x_t, t, cond).float()
    assert not torch.allclose(policy, reference), "adapters were not switched back on after the reference pass"


def test_config_checks_data_layout_and_reference(tiny_sd, prefs, tmp_path):
    from trainers.config import ConfigError

    bad = tree(tiny_sd, prefs, tmp_path, "kto")
    bad["data"]["kind"] = "preference_folder"
    with pytest.raises(ConfigError, match="dpo.loss 'kto' needs labelled"):
        resolve(bad, "<test>")
    with pytest.raises(ConfigError, match="'adapters_off' needs LoRA"):
        resolve(tree(tiny_sd, prefs, tmp_path, "dpo", reference="adapters_off"), "<test>")
    with pytest.raises(ConfigError, match="pixel.weight > 0 is defined for loss dpo or simpo"):
        resolve(tree(tiny_sd, prefs, tmp_path, "mapo", pixel={"weight": 1.0}), "<test>")
    with pytest.raises(ConfigError, match=r"dspo.weight \(lambda\) must be in \[0, 1\), got 2000"):
        resolve(tree(tiny_sd, prefs, tmp_path, "dspo", dspo={"weight": 2000.0}), "<test>")


def checkpoint_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    state = {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    for idx, slots in optimizer["state"].items():
        for slot, value in slots.items():
            state[f"opt.{idx}.{slot}"] = torch.as_tensor(value)
    return state


def test_resumed_run_equals_unbroken_run(tiny_sd, prefs, tmp_path):
    """2 steps straight vs 1 step, a fresh start (new bundle, new frozen reference copy) and 1 more."""
    unbroken = tree(tiny_sd, prefs, tmp_path / "a", "dpo")
    unbroken["train"].update(max_steps=2)
    run_loop(*build(unbroken))
    broken = tree(tiny_sd, prefs, tmp_path / "b", "dpo")
    run_loop(*build(broken))  # stops at 1 with a checkpoint
    broken["train"].update(max_steps=2)
    trainer = run_loop(*build(broken))
    assert trainer.state.step == 2
    a, b = checkpoint_state(tmp_path / "a", 2), checkpoint_state(tmp_path / "b", 2)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_cli_two_process_ddp(tiny_sd, prefs, tmp_path):
    """scripts/distill.py under `accelerate launch` with 2 CPU processes: ranks end identical, the
    policy moved from the source weights, and the exported VAE and text encoder did not."""
    t = tree(tiny_sd, prefs, tmp_path / "ddp", "dpo")
    t["export"] = {"enabled": True}
    config = tmp_path / "ddp.yaml"
    config.write_text("# python scripts/distill.py --config ddp.yaml\n" + json.dumps(t))
    launch_training(config)
    run = tmp_path / "ddp"
    assert_ranks_identical(run)
    source_unet = load_file(next((tiny_sd / "unet").glob("*.safetensors")))
    trained = load_file(run / "checkpoints" / f"step-{1:07d}" / "model.safetensors")
    assert any(not torch.equal(source_unet[k], trained[k]) for k in source_unet)
    for part in ("vae", "text_encoder"):
        src, out = (load_file(next((p / part).glob("*.safetensors"))) for p in (tiny_sd, run / "pipeline"))
        assert all(torch.equal(src[k], out[k]) for k in src), f"{part} changed"


# ------------------------------------------------------------------ real recipes on tiny architectures


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """Four Pick-a-Pic rows: a win for image 0, a win for image 1 (turned round), a tie (dropped), a win."""
    import io

    import datasets

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    folder = tmp_path_factory.mktemp("pickapic")
    datasets.Dataset.from_dict({
        "jpg_0": [jpeg() for _ in range(4)], "jpg_1": [jpeg() for _ in range(4)],
        "label_0": [1.0, 0.0, 0.5, 1.0], "caption": ["a red cube", "a blue ball", "a tie", "a green cone"],
    }).to_parquet(str(folder / "train-00000.parquet"))
    return folder


@pytest.mark.parametrize("recipe, family", [
    ("sd15_dpo.yaml", "sd"), ("sd15_dpo_lora.yaml", "sd"), ("sdxl_dpo.yaml", "sdxl"),
    ("sdxl_dpo_lora.yaml", "sdxl"), ("sdxl_mapo.yaml", "sdxl"), ("sd3_dpo.yaml", "sd3")])
def test_real_recipes_run_two_steps_on_tiny_architectures(recipe, family, pickapic, tmp_path):
    """Each real DPO recipe as written (bf16 autocast, its optimizer: Adafactor for SDXL DPO, its reference:
    a copy, adapters off, or none for MaPO; gradient checkpointing) on Pick-a-Pic parquet, with only the model
    swapped for a tiny one of the same family and the run cut to 2 steps at 16 px. The policy must move, a
    copied reference must not, and the export must hold what the recipe trains (adapters or a UNet)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import load_config
    from trainers.data import build_dataset
    from trainers.dpo import DPO
    from trainers.loop import train
    from trainers.run import export_run, load_run_bundle

    source = save_tiny_pipeline(family, tmp_path / "pipe")
    cfg = load_config(ROOT / "configs" / recipe, [
        f"model.source={source}", f"data.path={pickapic}", "data.resolution=16", "train.batch_size=2",
        "train.gradient_accumulation=1", "train.max_steps=2", "optim.warmup_steps=0",
        "optim.lr=1.0e-3", "train.checkpoint_every=0", "train.validate_every=0", "train.log_with=none",
        "train.log_every=1", f"output_dir={tmp_path / 'run'}", "dpo.sample_steps=2"])
    assert len(build_dataset(cfg.data)) == 3, "the tie is dropped"
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision)
    method = DPO(cfg, load_run_bundle(cfg, accelerator.device))
    policy = snapshot(method.policy)
    reference = snapshot(method.reference) if method.reference_mode == "copy" else None
    train(cfg, accelerator, method, build_dataset(cfg.data))
    AcceleratorState._reset_state(reset_partial_state=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    moved = changed(policy, method.policy)
    assert moved, "the policy did not train"
    if cfg.model.lora.rank:
        assert all("lora" in k for k in moved), "only the adapters train"
    if reference is not None:
        assert not changed(reference, method.reference), "the reference moved"
    folder = export_run(cfg, method, (ROOT / "configs" / recipe).read_text())
    assert (folder / "pytorch_lora_weights.safetensors").is_file() == bool(cfg.model.lora.rank)
