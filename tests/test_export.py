"""Exports load in plain diffusers, in a fresh process that cannot import diffstill (pipelines/export.py)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import LCMScheduler
from safetensors.torch import load_file

from pipelines.backbones import LoraSpec, load_bundle
from pipelines.export import LORA_WEIGHTS, ModelCard, export_pipeline
from pipelines.tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
CARD = ModelCard(method="lcd", base_model="org/tiny-base", recipe="method: lcd\nsteps: 3\n", steps_trained=3,
                 recommended_steps=2, recommended_guidance=1.5, metrics={"fid": 12.3456, "clip_score": 0.31},
                 notes="Random tiny weights.")

# Runs with `python -I` (no PYTHONPATH, no cwd on sys.path) from a temporary folder: only diffusers.
FRESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from diffusers import DiffusionPipeline

    folders = json.loads(sys.argv[1])
    report = {}
    for name in ("sd", "sd3", "lora"):
        pipe = DiffusionPipeline.from_pretrained(folders[name])
        pipe.set_progress_bar_config(disable=True)
        images = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
        report[name] = {"shape": list(images.shape), "finite": bool(torch.isfinite(torch.tensor(images)).all()),
                        "scheduler": type(pipe.scheduler).__name__}
    # The adapters on the base model must act like the merged denoiser of the full export.
    merged = DiffusionPipeline.from_pretrained(folders["lora"]).unet
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        reference = merged(x, t, states).sample
        for name in ("lora", "lora_only"):
            base = DiffusionPipeline.from_pretrained(folders["base_sd"])
            base.load_lora_weights(folders[name])
            report[name + "_max_diff"] = (base.unet(x, t, states).sample - reference).abs().max().item()
        plain = DiffusionPipeline.from_pretrained(folders["base_sd"]).unet
        report["base_max_diff"] = (plain(x, t, states).sample - reference).abs().max().item()
    # Same for a transformer LoRA (peft key names), and an SD3 export saved without T5.
    merged = DiffusionPipeline.from_pretrained(folders["lora_sd3"]).transformer
    base = DiffusionPipeline.from_pretrained(folders["base_sd3"])
    base.load_lora_weights(folders["lora_sd3"])
    x, states = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 40, 64, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    with torch.no_grad():
        reference = merged(x, encoder_hidden_states=states, pooled_projections=pooled, timestep=t).sample
        report["lora_sd3_max_diff"] = (base.transformer(x, encoder_hidden_states=states, pooled_projections=pooled,
                                                        timestep=t).sample - reference).abs().max().item()
    pipe = DiffusionPipeline.from_pretrained(folders["sd3_no_t5"], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    report["sd3_no_t5"] = {"shape": list(images.shape), "finite": bool(torch.isfinite(torch.tensor(images)).all()),
                           "scheduler": type(pipe.scheduler).__name__}
    report["diffstill_modules"] = sorted(
        m for m in sys.modules if m.split(".")[0] in {"pipelines", "trainers", "rewards", "evaluation"})
    report["sys_path"] = sys.path
    print(json.dumps(report))
""")


def _perturb(module: torch.nn.Module, seed: int, only: str = "") -> dict[str, torch.Tensor]:
    """Stand-in for training: move the (selected) weights; returns the resulting state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    folders = {"base_sd": save_tiny_pipeline("sd", root / "base_sd"),
               "base_sd3": save_tiny_pipeline("sd3", root / "base_sd3")}
    trained = {}

    sd = load_bundle(str(folders["base_sd"]))
    trained["sd"] = _perturb(sd.denoiser, seed=1)
    lcm = LCMScheduler.from_config(sd.scheduler.config)
    folders["sd"] = export_pipeline(sd, sd.denoiser, root / "out" / "sd", scheduler=lcm, model_card=CARD)

    sd3 = load_bundle(str(folders["base_sd3"]))
    trained["sd3"] = _perturb(sd3.denoiser, seed=2)
    folders["sd3"] = export_pipeline(sd3, sd3.denoiser, root / "out" / "sd3", model_card=CARD)

    lora = load_bundle(str(folders["base_sd"]), lora=LoraSpec(rank=4, alpha=8))
    trained["lora"] = _perturb(lora.denoiser, seed=3, only="lora_B")
    folders["lora"] = export_pipeline(lora, lora.denoiser, root / "out" / "lora", model_card=CARD)
    folders["lora_only"] = export_pipeline(lora, lora.denoiser, root / "out" / "lora_only", model_card=CARD,
                                           lora_only=True)

    lora_sd3 = load_bundle(str(folders["base_sd3"]), lora=LoraSpec(rank=2, alpha=6))
    _perturb(lora_sd3.denoiser, seed=4, only="lora_B")
    folders["lora_sd3"] = export_pipeline(lora_sd3, lora_sd3.denoiser, root / "out" / "lora_sd3", model_card=CARD)
    no_t5 = load_bundle(str(save_tiny_pipeline("sd3-no-t5", root / "base_sd3_no_t5")))
    folders["sd3_no_t5"] = export_pipeline(no_t5, no_t5.denoiser, root / "out" / "sd3_no_t5", model_card=CARD)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    argv = [sys.executable, "-I", "-c", FRESH_SCRIPT, json.dumps({k: str(v) for k, v in folders.items()})]
    run = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return folders, trained, report


def test_fresh_process_generates_without_diffstill(exports):
    folders, _, report = exports
    assert report["diffstill_modules"] == []
    assert str(REPO) not in report["sys_path"]
    for name in ("sd", "sd3", "lora"):
        assert report[name]["shape"] == [1, 32, 32, 3] and report[name]["finite"], name
    assert report["sd"]["scheduler"] == "LCMScheduler"  # the given scheduler, not the bundle's DDIM
    assert report["sd3"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert report["sd3_no_t5"]["shape"] == [1, 32, 32, 3] and report["sd3_no_t5"]["finite"]


@pytest.mark.parametrize("name,weights", [("sd", "unet"), ("sd3", "transformer")])
def test_exported_denoiser_equals_trained(exports, name, weights):
    folders, trained, _ = exports
    saved = load_file(folders[name] / weights / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == trained[name].keys()
    assert all(torch.equal(saved[k], trained[name][k]) for k in saved)


def test_lora_export_is_merged_and_loadable(exports):
    """Merged weight W' = W + (alpha / r) B A with alpha=8, r=4; the adapters on the base reproduce it."""
    folders, trained, report = exports
    saved = load_file(folders["lora"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("lora" in k for k in saved)
    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = trained["lora"][f"{prefix}.lora_A.default.weight"], trained["lora"][f"{prefix}.lora_B.default.weight"]
    expected = trained["lora"][f"{prefix}.base_layer.weight"] + (8 / 4) * b @ a
    torch.testing.assert_close(saved[f"{prefix}.weight"], expected)
    assert (folders["lora"] / LORA_WEIGHTS).is_file()
    assert sorted(p.name for p in folders["lora_only"].iterdir()) == ["README.md", LORA_WEIGHTS]
    assert report["lora_max_diff"] < 1e-5 and report["lora_only_max_diff"] < 1e-5
    assert report["base_max_diff"] > 1e-3  # the adapters changed something, so the match above means something
    assert report["lora_sd3_max_diff"] < 1e-5


def test_model_card(exports):
    folders, _, _ = exports
    text = (folders["sd"] / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "diffusers" and meta["base_model"] == "org/tiny-base"
    assert {"diffusers", "text-to-image", "lcd"} <= set(meta["tags"]) and "lora" not in meta["tags"]
    assert "lora" in yaml.safe_load((folders["lora"] / "README.md").read_text().split("---\n")[1])["tags"]
    assert "num_inference_steps=2, guidance_scale=1.5" in body
    assert "| fid | 12.35 |" in body and "| clip_score | 0.31 |" in body
    assert "```yaml\nmethod: lcd\nsteps: 3\n```" in body
    assert "steps trained: 3" in body and "Random tiny weights." in body
    assert 'from_pretrained("sd")\n' in body
    no_t5 = (folders["sd3_no_t5"] / "README.md").read_text()
    assert 'from_pretrained("sd3_no_t5", text_encoder_3=None, tokenizer_3=None)' in no_t5


def test_local_base_model_is_not_hub_metadata(tmp_path):
    card = ModelCard(method="sft", base_model=str(tmp_path))
    assert "base_model" not in card.front_matter(lora=False)


def test_only_safetensors(exports):
    folders, _, _ = exports
    for name in ("sd", "sd3", "lora", "lora_only", "lora_sd3", "sd3_no_t5"):
        suffixes = {p.suffix for p in folders[name].rglob("*") if p.is_file()}
        assert suffixes <= {".json", ".safetensors", ".md", ".txt"}, (name, suffixes)


def test_no_part_config_names_the_trainers_disk(exports):
    """The bases were loaded from local folders, which diffusers records as `_name_or_path`."""
    folders, _, _ = exports
    for name in ("sd", "sd3", "lora"):
        configs = list(folders[name].glob("*/config.json"))
        assert configs, name
        for config_file in configs:
            assert "_name_or_path" not in json.loads(config_file.read_text()), config_file


def test_atomic_replace(tmp_path, monkeypatch):
    bundle = load_bundle(str(save_tiny_pipeline("sd", tmp_path / "base")))
    out = tmp_path / "runs" / "student"
    export_pipeline(bundle, bundle.denoiser, out, model_card=ModelCard(method="first", base_model="b"))
    export_pipeline(bundle, bundle.denoiser, out, model_card=ModelCard(method="second", base_model="b"))
    assert "`second`" in (out / "README.md").read_text()
    assert [p.name for p in out.parent.iterdir()] == ["student"]  # no partial or old folders left

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ModelCard, "render", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_pipeline(bundle, bundle.denoiser, out, model_card=ModelCard(method="third", base_model="b"))
    monkeypatch.undo()
    assert "`second`" in (out / "README.md").read_text()
    assert [p.name for p in out.parent.iterdir()] == ["student"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a pipeline export"):
        export_pipeline(bundle, bundle.denoiser, precious, model_card=CARD)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_lora_only_needs_adapters_and_a_loader(tmp_path):
    sd = load_bundle(str(save_tiny_pipeline("sd", tmp_path / "sd")))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_pipeline(sd, sd.denoiser, tmp_path / "out", model_card=CARD, lora_only=True)
    pixart = load_bundle(str(save_tiny_pipeline("pixart", tmp_path / "pixart")), lora=LoraSpec(rank=2))
    with pytest.raises(ValueError, match="PixArtSigmaPipeline cannot load LoRA files"):
        export_pipeline(pixart, pixart.denoiser, tmp_path / "out", model_card=CARD, lora_only=True)
    # The merged export still works for PixArt, without a LoRA file.
    out = export_pipeline(pixart, pixart.denoiser, tmp_path / "out", model_card=CARD)
    assert (out / "model_index.json").is_file() and not (out / LORA_WEIGHTS).exists()
    assert not any("lora" in k for k in load_file(out / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_model_card_of_a_flow_student_passes_its_sigmas():
    """With recommended sigmas the usage call passes them in place of num_inference_steps (a flow scheduler's
    default N-step grid ends at sigma 0.001), and the training facts say what they are."""
    from pipelines.export import ModelCard

    card = ModelCard(method="tbcm", base_model="org/flow", recommended_steps=2, recommended_guidance=1.0,
                     recommended_sigmas=[1.0, 0.6089407666]).render(
        name="student", pipeline_class="SanaPipeline", lora_file=False, full_pipeline=True)
    assert "image = pipe(prompt, sigmas=[1.0, 0.608941], guidance_scale=1.0).images[0]" in card
    assert "num_inference_steps" not in card and "- sigmas of those steps: [1.0, 0.608941]" in card


def test_recipe_is_read_before_training(tmp_path, monkeypatch):
    """The card's recipe text is read when the run starts: a recipe file moved or deleted during a long run
    (here: by the stub training) must not fail the export or change what the card says was run."""
    from types import SimpleNamespace

    import trainers.run as run_module
    from trainers.config import load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: sft\n# the text a card must carry\n")
    cfg = load_config(None, ["method=sft", "model.source=tiny-sd", f"output_dir={tmp_path / 'run'}"])
    captured = {}

    def fake_train(cfg, accelerator, method, dataset):
        recipe.unlink()
        return SimpleNamespace(stopped=False, last_eval=None)

    monkeypatch.setattr(run_module, "build_dataset", lambda data: None)
    monkeypatch.setattr(run_module, "load_run_bundle", lambda cfg, device: None)
    monkeypatch.setattr(run_module, "method_class", lambda name: lambda cfg, bundle: None)
    monkeypatch.setattr(run_module, "train", fake_train)
    monkeypatch.setattr(run_module, "export_run", lambda cfg, method, text, trainer: captured.setdefault("text", text))
    accelerator = SimpleNamespace(device="cpu", is_main_process=True, print=lambda *a: None,
                                  wait_for_everyone=lambda: None, end_training=lambda: None)
    assert run_module.run(cfg, accelerator, recipe_path=str(recipe)) == 0
    assert captured["text"].startswith("method: sft\n# the text a card must carry\n\n# resolved:\n")
