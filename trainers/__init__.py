"""Trainers: one file per method on one shared training loop.

`METHODS` is the registry: the name used in YAML (`method: sft`) -> (module,
class). Modules are imported only when their method is asked for, so loading
one recipe never imports every method's dependencies.
"""

METHODS: dict[str, tuple[str, str]] = {
    "sft": ("trainers.sft", "SFT"),
    "lcd": ("trainers.lcd", "LCD"),
    "rg_lcd": ("trainers.rg_lcd", "RGLCD"),
    "tbcm": ("trainers.tbcm", "TBCM"),
    "scm": ("trainers.scm", "SCM"),
    "dpo": ("trainers.dpo", "DPO"),
    "reflow": ("trainers.reflow", "Reflow"),
    "fdistill": ("trainers.fdistill", "FDistill"),
    "distill_dpo": ("trainers.distill_dpo", "DistillDPO"),
}
