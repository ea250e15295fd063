"""What every fine-tuning loop shares, so training and QAT run on one machinery: the learning-rate
schedule, the optimizer, one optimizer step, top-1 evaluation, selection on source validation, and
the resumable state (model, optimizer, gradient scaler, RNG; safetensors, no pickles)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rise_edge.config import OptimConfig
from rise_edge.run_dir import load_training_state, save_training_state
from rise_edge.train.distributed import Distributed


def learning_rate(optim: OptimConfig, step: int, total: int) -> float:
    """The lr at `step` (0-based) of `total`: warm-up, then step, cosine or constant."""
    warm = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.schedule == "step":
        return optim.lr * warm * (optim.gamma if step >= round(optim.step_at * total) else 1.0)
    if optim.schedule == "cosine":
        return optim.lr * warm * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return optim.lr * warm


def build_optimizer(optim: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW, as `optim` names, at its peak lr and weight decay."""
    params = list(params)
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> None:
    """Backward through the loss (scaled when the scaler is enabled: fp16) and one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def count_correct(model: nn.Module, loader: DataLoader, device: torch.device,
                  dist: Distributed = Distributed(),
                  autocast: contextlib.AbstractContextManager | None = None) -> tuple[int, int]:
    """(correct, images) of the model's top-1 over the loader's (images (B, 3, S, S), labels (B,)),
    summed over all ranks."""
    model.eval()
    correct, total = 0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            logits = model(images)
        correct += int((logits.argmax(dim=1) == labels).sum())
        total += int(labels.numel())
    correct, total = dist.sum([correct, total])
    return int(correct), int(total)


def improves(score: float, best: float, model: nn.Module) -> bool:
    """Selection: a higher mean source-validation score, and a model whose weights are all finite
    (a model with a non-finite weight is never selected, whatever it scored)."""
    return score > best and all(bool(torch.isfinite(t).all())
                                for t in model.state_dict().values() if t.is_floating_point())


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, metadata: dict[str, Any]) -> None:
    """Everything a loop needs to resume exactly, with the loop's own `metadata` (JSON)."""
    save_training_state(path, model, optimizer, {
        **metadata, "scaler": scaler.state_dict() if scaler.is_enabled() else {}})


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, device: torch.device | None = None) -> dict[str, Any]:
    """Restore what save_state wrote into model, optimizer and scaler; returns the loop's metadata."""
    metadata = load_training_state(path, model, optimizer, device)
    if metadata.get("scaler"):
        scaler.load_state_dict(metadata["scaler"])
    return metadata
