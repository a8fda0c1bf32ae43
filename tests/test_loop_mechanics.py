"""Loop mechanics on toy linear 'methods': group selection, accumulation, EMA, LR schedules, grids.

In-process and tiny: a single-process Accelerator and nn.Linear networks, so each property is
checked exactly rather than through a diffusion model.
"""
import json
import math

import pytest
import torch
from accelerate import Accelerator

from trainers.config import OptimConfig, RunConfig
from trainers.batches import collate
from trainers.loop import Trainer, step_generator
from trainers.method import LossOutput, Method
from trainers.optim import build_optimizer, lr_at, use_fused


class Points(torch.utils.data.Dataset):
    """x_i = i (as a 1-vector); the regression target is 2 x_i."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i)]), "prompt": f"p{i}", "skipped": 0}


class TwoGroups(Method):
    """Generator and critic: the generator steps on even steps, the critic on odd ones."""

    def __init__(self, cfg):
        self.cfg, self.options = cfg, None
        torch.manual_seed(0)
        self.nets = {"generator": torch.nn.Linear(1, 1), "critic": torch.nn.Linear(1, 1)}
        self.seen_groups = []

    def trainable(self):
        return dict(self.nets)

    def averaged(self):
        return {"ema": ("generator", 0.5)}

    def groups_for_step(self, step):
        return ["generator"] if step % 2 == 0 else ["critic"]

    def loss(self, batch, step, groups, generator):
        self.seen_groups.append(list(groups))
        x = batch["x"]
        net = self.modules[groups[0]]
        return LossOutput(((net(x) - 2 * x) ** 2).squeeze(1), {"mean_x": x.mean()})


def make_cfg(tmp_path, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.output_dir = str(tmp_path)
    cfg.optim = OptimConfig(name="sgd", lr=0.01, weight_decay=0.0)
    for k, v in {"batch_size": 2, "max_grad_norm": 0.0, "max_steps": 4, **train}.items():
        setattr(cfg.train, k, v)
    return cfg


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_only_the_selected_group_steps(tmp_path):
    method = TwoGroups(make_cfg(tmp_path))
    trainer = Trainer(method.cfg, Accelerator(cpu=True), method, Points())
    gen0, critic0 = params(method.nets["generator"]), params(method.nets["critic"])
    trainer.run_step()  # step 0: generator
    assert all(not torch.equal(a, b) for a, b in zip(gen0, params(method.nets["generator"])))
    assert all(torch.equal(a, b) for a, b in zip(critic0, params(method.nets["critic"])))
    trainer.state.step = 1
    gen1 = params(method.nets["generator"])
    trainer.run_step()  # step 1: critic
    assert all(torch.equal(a, b) for a, b in zip(gen1, params(method.nets["generator"])))
    assert all(not torch.equal(a, b) for a, b in zip(critic0, params(method.nets["critic"])))
    assert method.seen_groups == [["generator"], ["critic"]]


def test_ema_follows_its_group_with_its_decay(tmp_path):
    """EMA with decay 0.5 after one generator step: ema = 0.5 * w_0 + 0.5 * w_1."""
    method = TwoGroups(make_cfg(tmp_path))
    trainer = Trainer(method.cfg, Accelerator(cpu=True), method, Points())
    w0 = params(method.nets["generator"])
    trainer.run_step()
    w1 = params(method.nets["generator"])
    for e, a, b in zip(params(trainer.averages["ema"]), w0, w1):
        torch.testing.assert_close(e, 0.5 * a + 0.5 * b)
    assert not any(p.requires_grad for p in trainer.averages["ema"].parameters())


def test_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 2 with accumulation == one batch of 4 (mean loss, plain SGD, same items)."""
    small = TwoGroups(make_cfg(tmp_path / "a", batch_size=2, gradient_accumulation=2))
    Trainer(small.cfg, Accelerator(cpu=True), small, Points()).run_step()
    large = TwoGroups(make_cfg(tmp_path / "b", batch_size=4))
    Trainer(large.cfg, Accelerator(cpu=True), large, Points()).run_step()
    for a, b in zip(params(small.nets["generator"]), params(large.nets["generator"])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class SometimesLogged(TwoGroups):
    """Logs `first_x` on its first micro-step only, like a per-group log that some batches lack; keeps every
    batch it sees."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen = []

    def loss(self, batch, step, groups, generator):
        out = super().loss(batch, step, groups, generator)
        if not self.seen:
            out.logs["first_x"] = batch["x"].mean()
        self.seen.append(batch["x"].clone())
        return out


def test_accumulated_logs_average_over_the_micro_steps_that_logged_them(tmp_path):
    """Accumulation 2: a key both micro-steps log is their mean; a key only the first logs is its value,
    not half of it (a mean over all micro-steps would halve it). The expected values are recomputed from
    the batches the method saw."""
    method = SometimesLogged(make_cfg(tmp_path, batch_size=2, gradient_accumulation=2))
    logs = Trainer(method.cfg, Accelerator(cpu=True), method, Points()).run_step()
    means = [float(x.mean()) for x in method.seen]
    assert len(means) == 2 and means[0] != 0.0
    assert float(logs["mean_x"]) == pytest.approx(sum(means) / 2)
    assert float(logs["first_x"]) == pytest.approx(means[0])


class Recording(TwoGroups):
    """TwoGroups that keeps each step's batch, so a test can recompute the gradient the loop saw."""

    def loss(self, batch, step, groups, generator):
        self.last_batch = batch
        return super().loss(batch, step, groups, generator)


def test_gradient_clipping_rescales_to_max_norm(tmp_path):
    """SGD with clipping at c: w_1 = w_0 - lr * g * min(1, c / |g|), |g| the global norm over the group's
    parameters. g is recomputed here with autograd on the same batch: loss = mean_i (w x_i + b - 2 x_i)^2.
    With c = 0.01 the clip is active (|g| is O(10) for x in 0..7); with c = 1e6 it leaves g alone."""
    for c in (0.01, 1e6):
        method = Recording(make_cfg(tmp_path / str(c), max_grad_norm=c))
        trainer = Trainer(method.cfg, Accelerator(cpu=True), method, Points())
        net = method.nets["generator"]
        w0 = params(net)
        trainer.run_step()
        x = method.last_batch["x"]
        w, b = (p.clone().requires_grad_(True) for p in w0)
        (((x @ w.T + b) - 2 * x) ** 2).squeeze(1).mean().backward()
        norm = torch.sqrt(w.grad.pow(2).sum() + b.grad.pow(2).sum())
        scale = min(1.0, c / float(norm))
        assert (scale < 0.01) == (c == 0.01)
        for after, before, g in zip(params(net), w0, (w.grad, b.grad)):
            torch.testing.assert_close(after, before - 0.01 * g * scale, rtol=1e-5, atol=1e-7)


def test_checkpoints_keep_the_last_k(tmp_path):
    """checkpoint_every=1 and keep_checkpoints=2 over 5 steps: only steps 4 and 5 remain, no temp folders."""
    from trainers.checkpoint import list_checkpoints
    from trainers.loop import train

    method = TwoGroups(make_cfg(tmp_path, max_steps=5, checkpoint_every=1, keep_checkpoints=2))
    train(method.cfg, Accelerator(cpu=True), method, Points())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_lr_schedules_by_hand():
    """Warm-up 2 then cosine over 10 steps at lr 1: step 0 -> 0.5, step 1 -> 1, step 6 -> (1 + cos(pi/2))/2 = 0.5."""
    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    assert lr_at(0, cfg, 10) == pytest.approx(0.5)
    assert lr_at(1, cfg, 10) == pytest.approx(1.0)
    assert lr_at(6, cfg, 10) == pytest.approx(0.5)
    assert lr_at(10, cfg, 10) == pytest.approx(0.0, abs=1e-12)
    linear = OptimConfig(lr=2.0, schedule="linear")
    assert lr_at(5, linear, 10) == pytest.approx(1.0)
    assert lr_at(3, OptimConfig(lr=2.0), 10) == 2.0


def test_decay_steps_holds_the_peak_then_decays_over_the_end():
    """Warm-up 2, linear decay over the last 4 of 10 steps at lr 1: the decay starts at step 10 - 4 = 6, so steps 2
    to 6 hold 1, step 8 is (8 - 6) / 4 = half way -> 0.5, step 10 -> 0. Cosine over the same window at step 8 is
    (1 + cos(pi/2)) / 2 = 0.5 too, and at step 7 (1 + cos(pi/4)) / 2 = 0.8536. A window longer than the run after
    warm-up starts at the end of warm-up, as without decay_steps."""
    linear = OptimConfig(lr=1.0, warmup_steps=2, schedule="linear", decay_steps=4)
    assert [lr_at(s, linear, 10) for s in (0, 2, 5, 6)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert lr_at(8, linear, 10) == pytest.approx(0.5)
    assert lr_at(10, linear, 10) == pytest.approx(0.0, abs=1e-12)
    cosine = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", decay_steps=4)
    assert lr_at(8, cosine, 10) == pytest.approx(0.5)
    assert lr_at(7, cosine, 10) == pytest.approx(0.8535534)
    long = OptimConfig(lr=1.0, warmup_steps=2, schedule="linear", decay_steps=50)
    assert lr_at(6, long, 10) == pytest.approx(lr_at(6, OptimConfig(lr=1.0, warmup_steps=2, schedule="linear"), 10))
    with pytest.raises(ValueError, match="optim.decay_steps needs a decay"):
        OptimConfig(schedule="constant", decay_steps=10)
    with pytest.raises(ValueError, match="decay_steps must be >= 0"):
        OptimConfig(schedule="linear", decay_steps=-1)


def test_fused_adamw_takes_the_same_steps():
    """optim.fused switches the kernel, not the update: three AdamW steps on the same gradients land on the same
    parameters (to float32 rounding) with the fused kernel and with the multi-tensor one. The default picks fused
    only when every parameter is on CUDA, so CPU runs keep the multi-tensor path."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    finals = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = build_optimizer(params, OptimConfig(lr=0.1, fused=fused))
        assert opt.defaults["fused"] is fused
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for a, b, p0 in zip(*finals, start):
        assert (a - p0).abs().max() > 0.1  # three steps of lr 0.1 moved every tensor
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert use_fused([torch.zeros(1)], None) is False
    assert use_fused([torch.zeros(1, device="meta")], None) is False


def test_step_generators_depend_on_seed_rank_and_step_only():
    draw = lambda *key: torch.randn(3, generator=step_generator(*key, torch.device("cpu")))  # noqa: E731
    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))
    assert not torch.equal(draw(0, 0, 5), draw(1, 0, 5))


def test_collate_stacks_lists_and_counts_skips():
    batch = collate([{"x": torch.zeros(2), "prompt": "a", "skipped": 1},
                     {"x": torch.ones(2), "prompt": "b", "skipped": 2}])
    assert batch["x"].shape == (2, 2) and batch["prompt"] == ["a", "b"] and batch["skipped"] == 3


def test_save_grid_layout(tmp_path):
    from PIL import Image

    from pipelines.images import save_grid

    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 1.0, -1.0)])
    path = save_grid(images, tmp_path / "g.png", nrow=2, scale=1)
    grid = Image.open(path)
    # 2 columns x 2 rows of 4x4 tiles with 2-px padding: (2*4 + 3*2) square.
    assert grid.size == (14, 14)
    assert grid.getpixel((2, 2)) == (0, 0, 0) and grid.getpixel((8, 2)) == (255, 255, 255)
    assert math.isclose(sum(grid.getpixel((8, 8))), 765)  # empty 4th cell stays white


def test_metrics_lines_past_the_restart_step_are_dropped(tmp_path):
    """Resuming at step 4 keeps the lines of steps 2 and 4 and drops 6 (logged after the last checkpoint, then
    killed) and a half-written line; restarting from scratch (step 0) drops them all; a missing file stays
    missing."""
    from trainers.loop import drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (2, 4, 6)))
    drop_metrics_after(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    path.write_text(path.read_text() + '{"step": 6, "lo')  # a line cut short by the kill
    drop_metrics_after(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    drop_metrics_after(path, 0)
    assert path.read_text() == ""
    drop_metrics_after(tmp_path / "absent.jsonl", 3)
    assert not (tmp_path / "absent.jsonl").exists()
