"""A deterministic validation loss for the builtin trainer.

The set (the default, and for now the one mode): **every training picture at fixed timesteps
and fixed noise**. A character LoRA has a dozen or so pictures, one per angle, and holding some
out would take angles away from the training (and change what is trained); what the curve must
show is the model's loss without the training loss's noise, which comes from the random
timestep and noise of each step. So each picture (its unflipped latent) is noised at
:data:`VALIDATION_TIMESTEPS` timesteps spread evenly over the schedule
(``t_k = (k + ½)·T/K``), with noise drawn once from a generator of its own
(``seed + VALIDATION_SEED_OFFSET``, on the CPU: the same on every device), and the loss is the
plain MSE of the prediction against the training target (the noise, or the velocity for
v-prediction models), averaged over pictures and timesteps — no min-SNR weighting or noise
offset, so it stays comparable between variants that train with different loss options.

Evaluating it draws nothing from the training's random streams and changes no weights
(``torch.no_grad``, eval mode, the modes restored), so a training with validation writes the
same LoRA as one without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: Timesteps per picture, evenly spread over the noise schedule.
VALIDATION_TIMESTEPS = 4
#: Added to the training seed for the validation noise (any fixed number: not the training's stream).
VALIDATION_SEED_OFFSET = 7919
#: Pictures × timesteps evaluated per UNet call.
VALIDATION_BATCH = 4

#: ``predict(noisy_latents, timesteps, captions, sizes_hw) -> UNet output``: the model call of the
#: architecture (``sizes_hw``: each picture's (height, width) in pixels, for SDXL's size ids).
Predict = Callable[[Any, Any, list, list], Any]


def fixed_timesteps(num_train_timesteps: int, k: int = VALIDATION_TIMESTEPS) -> list[int]:
    """``k`` timesteps evenly spread over ``0..num_train_timesteps-1`` (the middle of each k-th)."""
    return [min(num_train_timesteps - 1, int((i + 0.5) * num_train_timesteps / k)) for i in range(k)]


@dataclass
class ValidationCase:
    latent: Any  # (4, h, w) float32, CPU
    noise: Any  # same shape, fixed
    timestep: int
    caption: str
    size_hw: tuple[int, int] | None = None  # the picture's bucket (height, width) in pixels


class ValidationSet:
    """The fixed cases of one training (built once, before the first step)."""

    def __init__(self, cases: list[ValidationCase]):
        self.cases = cases

    @classmethod
    def build(cls, latents: dict, captions: list[str], num_train_timesteps: int, seed: int,
              k: int = VALIDATION_TIMESTEPS, sizes_hw: list[tuple[int, int]] | None = None) -> "ValidationSet":
        """Cases for every picture ``i`` of ``latents[(i, False)]`` with caption ``captions[i]``
        (and pixel size ``sizes_hw[i]``)."""
        import torch

        gen = torch.Generator("cpu").manual_seed(int(seed) + VALIDATION_SEED_OFFSET)
        steps = fixed_timesteps(num_train_timesteps, k)
        cases = []
        for i in sorted(i for i, flipped in latents if not flipped):
            lat = latents[(i, False)]
            for t in steps:
                noise = torch.randn(lat.shape, generator=gen, dtype=torch.float32)
                cases.append(ValidationCase(lat, noise, t, captions[i], sizes_hw[i] if sizes_hw else None))
        return cls(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def evaluate(self, predict: Predict, noise_scheduler, device, modules=(), autocast=None) -> float:
        """The mean validation loss with the model as it is now (no gradients, no random draws)."""
        import torch

        from .loss import training_target

        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        groups: dict[tuple, list[ValidationCase]] = {}
        for c in self.cases:
            groups.setdefault(tuple(c.latent.shape), []).append(c)
        total, count = 0.0, 0
        prediction_type = noise_scheduler.config.prediction_type
        alphas = noise_scheduler.alphas_cumprod.to(device)
        try:
            with torch.no_grad():
                for shape in sorted(groups):
                    cases = groups[shape]
                    for k in range(0, len(cases), VALIDATION_BATCH):
                        chunk = cases[k : k + VALIDATION_BATCH]
                        lat = torch.stack([c.latent for c in chunk]).to(device)
                        eps = torch.stack([c.noise for c in chunk]).to(device)
                        t = torch.tensor([c.timestep for c in chunk], device=device, dtype=torch.long)
                        noisy = noise_scheduler.add_noise(lat, eps, t)
                        with autocast if autocast is not None else _null():
                            pred = predict(noisy, t, [c.caption for c in chunk], [c.size_hw for c in chunk])
                        target = training_target(prediction_type, lat, eps, t, alphas)
                        per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
                        total += float(per.mean(dim=list(range(1, per.ndim))).sum())
                        count += len(chunk)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return total / max(count, 1)


def training_predict(setup, prep) -> Predict:
    """The training's own model call (:func:`.conditioning.text_conditioning`, ``unet_conditioning``,
    ``predict_noise``): the same encoders, caption cache and casts as a training step. SDXL's
    size ids: original = target = the picture's bucket size, no crop (a validation case is
    never cropped or flipped)."""
    from .sdxl import sdxl_time_ids
    from .conditioning import predict_noise, text_conditioning, unet_conditioning

    def predict(noisy, t, captions, sizes_hw):
        time_ids = None
        if prep.arch == "sdxl":
            if any(hw is None for hw in sizes_hw):
                raise ValueError("SDXL validation needs each picture's size (ValidationSet.build(sizes_hw=...))")
            sizes = list(sizes_hw)
            time_ids = sdxl_time_ids(sizes, [(0, 0)] * len(sizes), sizes, prep.device)
        cond, added = unet_conditioning(prep, text_conditioning(setup, prep, captions), time_ids)
        return predict_noise(prep, noisy, t, cond, added)

    return predict


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
