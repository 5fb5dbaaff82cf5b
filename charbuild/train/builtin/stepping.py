"""One optimizer step of the builtin trainer, skipped when its loss or gradients are not finite.

sd-scripts (accelerate) runs fp16 with a GradScaler, whose ``step`` skips the optimizer step
when a gradient overflowed and lowers the scale, and then skips the learning-rate schedule's
step too; the run goes on. :class:`Stepper` does the same for fp16 and extends it to bf16 and
fp32 (where sd-scripts would step on NaN gradients and ruin the LoRA): a step whose loss or
gradient norm is not finite changes no weight and no learning rate, and is counted.

Reading the loss for the log already waits for the GPU once per step; the loss and the
gradient norm come back together in that one read, so the finiteness check costs no second
synchronisation. (GradScaler's own ``step`` would read its overflow flag separately: the
optimizer is stepped directly, and ``update`` still lowers or raises the scale from the flags
that ``unscale_`` recorded.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_GRAD_NORM = 1.0  # sd-scripts' default --max_grad_norm


@dataclass
class Stepper:
    """Backward, unscale (fp16), clip at :data:`MAX_GRAD_NORM`, step optimizer and schedule."""

    optimizer: Any
    lr_scheduler: Any  # or None
    params: list  # the trainable parameters (clipped together)
    scaler: Any = None  # a torch.amp.GradScaler for fp16, else None
    skipped: list[int] = field(default_factory=list)  # the 1-based steps that were skipped
    steps: int = 0

    def __call__(self, loss) -> tuple[float, bool]:
        """Take one step from ``loss``; return (its value as a float, whether the weights changed)."""
        import torch

        self.steps += 1
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        value, norm_value = torch.stack([loss.detach().float(), norm.detach().float().to(loss.device)]).tolist()
        finite = math.isfinite(value) and math.isfinite(norm_value)
        if finite:
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        else:
            self.skipped.append(self.steps)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return value, finite
