"""What both trainers share: seeding, threads, the LR schedule, fp16 safetensors export, model cards."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """Torch intra-op threads (default 1: on this shared machine 2 threads stall behind other processes, see docs/models.md)."""
    threads = threads or int(os.environ.get("CAPFILT_TRAIN_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Budget:
    """A fixed number of steps (reproducible), with a wall-clock cap that stops early and says so."""

    def __init__(self, steps: int, minutes: float | None):
        self.steps, self.minutes = steps, minutes
        self.start = time.perf_counter()
        self.stopped_early_at: int | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self, step: int) -> bool:
        if self.minutes is not None and self.elapsed() > 60 * self.minutes:
            self.stopped_early_at = step
            return True
        return False


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98, eps 1e-6) with weight decay on weight matrices only: not on embeddings,
    biases or norms."""
    def decays(name, p):
        return p.ndim >= 2 and "embedding" not in name
    params = list(model.named_parameters())
    return torch.optim.AdamW([{"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay},
                              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def budget_figures(seed: int, steps: int, budget: "Budget", batch: int, lr: float, threads: int,
                   bf16: bool, data_seconds: float, started: float, history: list) -> dict:
    """The model card's record of a training run's budget, time and provenance."""
    return {"seed": seed, "steps": steps,
            "trained_steps": budget.stopped_early_at if budget.stopped_early_at is not None else steps,
            "batch": batch, "peak_lr": lr, "warmup_steps": max(1, steps // 20),  # as scheduled_steps
            "minutes_cap": budget.minutes, "threads": threads,
            "autocast": "bfloat16 (CPU, fp32 master weights)" if bf16 else None,
            "data_seconds": round(data_seconds, 1), "train_seconds": round(budget.elapsed(), 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "command": command_line(), "environment": environment(), "loss_history": history}


def scheduled_steps(optimizer, steps: int, lr: float, budget: Budget, log=print):
    """The step numbers, each with its learning rate set (`lr_at`: warm-up over the first 5%); stops
    early, and says so, when the budget's wall-clock cap is reached."""
    warmup = max(1, steps // 20)
    for step in range(steps):
        if budget.over(step):
            log(f"wall-clock cap of {budget.minutes} min reached at step {step}")
            return
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        yield step


def fp16_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating tensors as fp16, contiguous and unshared (safetensors refuses shared storage)."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        out[name] = (tensor.half() if tensor.is_floating_point() else tensor).contiguous().clone()
    return out


def command_line() -> str:
    """The command that is running, as one would type it again."""
    argv = sys.argv[1:] if sys.argv[0].endswith(("__main__.py", "lab/cli.py")) else sys.argv
    prefix = "python -m capfilt.lab " if argv is sys.argv[1:] or sys.argv[0].endswith("__main__.py") else ""
    return prefix + " ".join(shlex.quote(a) for a in argv)


def environment() -> dict:
    import open_clip
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def write_card(folder: Path, card: dict) -> None:
    (folder / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
