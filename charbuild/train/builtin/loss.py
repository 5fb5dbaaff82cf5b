"""Loss options as pure functions: prediction target, zero-terminal-SNR, min-SNR-γ, noise offset.

The formulas are sd-scripts' (``library/custom_train_functions.py`` and
``train_util.get_noise_noisy_latents_and_timesteps``), which SDXL users' settings refer to:

- target: the noise for ``epsilon``, ``v = √ᾱ_t · noise − √(1−ᾱ_t) · x₀`` for ``v_prediction``
  (diffusers' ``get_velocity``);
- zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed"): √ᾱ shifted so that its last value is 0 and scaled so that its first stays, then
  turned back into betas; sd-scripts leaves ᾱ_T exactly 0 (diffusers' own option puts 2⁻²⁴);
- SNR_t = (√ᾱ_t / √(1−ᾱ_t))²; min-SNR-γ weight = min(SNR_t, γ) / SNR_t for epsilon and
  min(SNR_t, γ) / (SNR_t + 1) for v-prediction (sd-scripts' ``apply_snr_weight``);
- ``scale_v_pred_loss_like_noise_pred``: weight SNR'_t / (SNR'_t + 1) with SNR' = min(SNR, 1000);
- noise offset: ``noise + offset · N(0, 1)`` drawn once per (image, channel); with an adaptive
  scale the offset grows by ``scale · |mean of the latent channel|`` (clamped at 0).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that the last timestep has SNR 0 and the first keeps its ᾱ."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def apply_zero_terminal_snr(noise_scheduler) -> None:
    """Rescale a diffusers DDPM scheduler's ``betas``/``alphas``/``alphas_cumprod`` in place."""
    betas = zero_terminal_snr_betas(noise_scheduler.betas)
    alphas = 1.0 - betas
    noise_scheduler.betas = betas
    noise_scheduler.alphas = alphas
    noise_scheduler.alphas_cumprod = torch.cumprod(alphas, dim=0)


def snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR of every timestep: (√ᾱ / √(1−ᾱ))² (inf at ᾱ = 1, 0 at ᾱ = 0)."""
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2


def min_snr_weights(timesteps: torch.Tensor, snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Per-sample min-SNR-γ loss weights for ``timesteps`` (``snr`` from :func:`snr_table`)."""
    s = snr.to(timesteps.device)[timesteps.long()]
    clipped = torch.minimum(s, torch.full_like(s, float(gamma)))
    return (clipped / (s + 1) if v_prediction else clipped / s).float()


def v_pred_like_noise_pred_weights(timesteps: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """sd-scripts' ``--scale_v_pred_loss_like_noise_pred`` weights: SNR' / (SNR' + 1), SNR' ≤ 1000."""
    s = snr.to(timesteps.device)[timesteps.long()]
    s = torch.minimum(s, torch.full_like(s, 1000.0))
    return s / (s + 1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target √ᾱ_t · noise − √(1−ᾱ_t) · latents."""
    a = alphas_cumprod.to(latents.device)[timesteps.long()].float()
    return _per_sample(a.sqrt(), latents) * noise - _per_sample((1 - a).sqrt(), latents) * latents


def training_target(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """What the UNet's output is compared with: the noise (epsilon) or the velocity."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(latents, noise, timesteps, alphas_cumprod)
    raise ValueError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: float | torch.Tensor | None,
    adaptive_noise_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``noise`` plus a per-(image, channel) constant: ``offset · N(0, 1)`` (sd-scripts' formula)."""
    if not noise_offset and adaptive_noise_scale is None:
        return noise
    offset = noise_offset or 0.0
    if adaptive_noise_scale is not None:
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
    draw_on = generator.device if generator is not None else latents.device
    shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=draw_on)
    return noise + offset * shift.to(latents.device, noise.dtype)
