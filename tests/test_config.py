"""Config tier: every recipe loads and resolves; bad input fails early with the key and file named."""
from pathlib import Path

import pytest
import yaml

from trainers.config import ConfigError, dump_config, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "scripts/distill.py" in first and str(path.relative_to(ROOT)) in first, \
        "the first line of a recipe is its launch command"
    again = load_config(save_config(cfg, tmp_path))
    assert dump_config(again) == dump_config(cfg)


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    tree = yaml.safe_load(path.read_text())
    assert tree["compute_environment"] == "LOCAL_MACHINE"
    assert tree["distributed_type"] in {"NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED"}
    assert tree["num_processes"] >= 1
    assert path.read_text().startswith("# accelerate launch --config_file configs/accelerate/")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "method: sft\ntrain:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "train.batch_sise" in message and "did you mean 'batch_size'" in message


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int, got str 'ten'"):
        load_config(path)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int, got bool"):
        load_config(write(tmp_path, "train:\n  batch_size: true\n"))


def test_literal_choices_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.mixed_precision: must be one of 'no', 'fp16', 'bf16'"):
        load_config(write(tmp_path, "train:\n  mixed_precision: fp8\n"))


def test_cross_field_check_names_section(tmp_path):
    with pytest.raises(ConfigError, match=r"sft: caption_dropout must be in \[0, 1\)"):
        load_config(write(tmp_path, "method: sft\nsft:\n  caption_dropout: 1.5\n"))


def test_method_cross_section_check(tmp_path):
    with pytest.raises(ConfigError, match="data.kind: sft trains on images"):
        load_config(write(tmp_path, "method: sft\ndata:\n  kind: prompts\n"))


def test_unknown_method_lists_known(tmp_path):
    with pytest.raises(ConfigError, match=r"method: unknown method 'sfft' \(known: sft"):
        load_config(write(tmp_path, "method: sfft\n"))


def test_options_of_another_method_are_rejected(tmp_path):
    METHODS_BESIDES_SFT = [m for m in __import__("trainers").METHODS if m != "sft"]
    if not METHODS_BESIDES_SFT:
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(write(tmp_path, "method: sft\nlcd: {}\n"))
    else:
        other = METHODS_BESIDES_SFT[0]
        with pytest.raises(ConfigError, match=f"options for method '{other}'"):
            load_config(write(tmp_path, f"method: sft\n{other}: {{}}\n"))


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, "method: sft\ntrain:\n  max_steps: 100\n")
    cfg = load_config(path, ["train.max_steps=7", "optim.lr=3e-4", "sft.caption_dropout=0.2"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4) and cfg.options.caption_dropout == 0.2
    with pytest.raises(ConfigError, match=r"with overrides train\.max_steps=x\).*train\.max_steps: expected int"):
        load_config(path, ["train.max_steps=x"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["train.max_steps"])


def test_group_optimizer_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-4\noptim_groups:\n  student:\n    lr: 2e-5\n"))
    assert cfg.group_optim("student").lr == pytest.approx(2e-5)
    assert cfg.group_optim("other").lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match=r"optim_groups\.student\.learning_rate: unknown key \(known keys: betas, decay_steps, eps, fused, lr"):
        load_config(write(tmp_path, "optim_groups:\n  student:\n    learning_rate: 2e-5\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_cli_dry_run_prints_config_and_bad_key_exits_2(capsys):
    """scripts/distill.py's main, in this process (the script only does sys.exit(main()))."""
    import distill

    recipe = str(RECIPES[0])
    assert distill.main(["--config", recipe, "--dry-run", "train.max_steps=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 3
    assert distill.main(["--config", recipe, "--dry-run", "train.nope=3"]) == 2
    err = capsys.readouterr().err
    assert "train.nope: unknown key" in err
    assert len(err.strip().splitlines()) == 1, "one clear line, no traceback"


def test_yaml_12_booleans_keep_no_a_string(tmp_path):
    """YAML 1.1 reads `no` as False; recipes say `mixed_precision: no`, so only true/false are bools."""
    cfg = load_config(write(tmp_path, "train:\n  mixed_precision: no\nexport:\n  enabled: false\n"),
                      ["train.ema_decay=0.5"])
    assert cfg.train.mixed_precision == "no" and cfg.export.enabled is False and cfg.train.ema_decay == 0.5


@pytest.mark.parametrize("path", [p for p in ACCELERATE if "deepspeed" in p.name], ids=lambda p: p.name)
def test_deepspeed_engine_settings_come_from_the_recipe(path, monkeypatch):
    """The shipped DeepSpeed configs leave batch, accumulation and clipping to the recipe: built into
    accelerate's DeepSpeedPlugin as `accelerate launch` would, they are 'auto' and get the SDXL recipe's
    train values. Without this, accelerate's prepare() refuses a run that passes it no dataloader."""
    from accelerate.utils import DeepSpeedPlugin

    from trainers.deepspeed_config import fill_deepspeed_config
    for var in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING"):
        monkeypatch.delenv(var, raising=False)
    plugin = DeepSpeedPlugin(**yaml.safe_load(path.read_text())["deepspeed_config"])
    train = load_config(ROOT / "configs" / "sdxl_sft_lpl.yaml").train
    filled = fill_deepspeed_config(plugin.deepspeed_config, train)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["gradient_clipping"]) == (train.batch_size, train.gradient_accumulation, train.max_grad_norm)
    assert train.gradient_accumulation > 1  # the case a fixed value in the accelerate config got wrong


def test_deepspeed_settings_that_disagree_with_the_recipe_are_one_error():
    from trainers.deepspeed_config import fill_deepspeed_config
    train = load_config(None, ["train.batch_size=4", "train.gradient_accumulation=2", "train.max_grad_norm=1.0"]).train
    same = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}
    assert fill_deepspeed_config(dict(same), train) == same
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=1 but the recipe has "
                                         r"train.gradient_accumulation=2"):
        fill_deepspeed_config({**same, "gradient_accumulation_steps": 1}, train)


def test_changed_settings_lists_each_differing_leaf_once():
    """Two trees differing in one nested leaf, one added key and one removed key.

    old: optim.lr 1e-3, optim.schedule linear, train.max_steps 10, train.seed 0
    new: optim.lr 1e-3, optim.schedule constant, train.max_steps 10, train.keep 2 (seed gone)
    By hand: lr and max_steps agree; schedule differs; seed is unset in new; keep is unset in old.
    Old keys come first in their order, then keys only the new tree has.
    """
    from trainers.config import changed_settings

    old = {"optim": {"lr": 1e-3, "schedule": "linear"}, "train": {"max_steps": 10, "seed": 0}}
    new = {"optim": {"lr": 1e-3, "schedule": "constant"}, "train": {"max_steps": 10, "keep": 2}}
    assert changed_settings(old, new) == ["optim.schedule: linear -> constant", "train.seed: 0 -> <unset>",
                                          "train.keep: <unset> -> 2"]
    assert changed_settings(old, old) == []
