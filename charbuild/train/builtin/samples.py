"""Sample images during a builtin training: diffusers' pipeline on the base model with the current LoRA.

The LoRA modules patch the UNet's and text encoder's ``forward`` (:mod:`.network`), so a
pipeline built from the training's own modules renders with the LoRA as it is at that step.
Rendering follows sd-scripts' sampling: DDIM from the training's noise schedule (its
prediction type and zero-terminal-SNR rescaling come with the config), guidance 7.5, an empty
negative prompt, one picture per prompt from a CPU generator seeded with the sample's fixed seed
(:mod:`charbuild.sample_prompts`), so the same LoRA gives the same picture on every run and
device type.

It must not change what is trained: the global torch random state is saved and restored around
every rendering (``torch.random.fork_rng``), the modules' train/eval modes are restored, and
nothing has gradients. SD1.x prompts are encoded by the trainer's own :func:`.conditioning.encode_text`
(its clip skip); SDXL through ``StableDiffusionXLPipeline`` with both encoders (its penultimate
layer, as sd-scripts' SDXL). The latents are decoded by the VAE in float32 (an fp16 SDXL VAE
overflows), each picture written atomically as ``samples/<step>/<name>.png`` with its prompt
in the PNG's ``parameters`` text (the web UIs' spelling).
"""

from __future__ import annotations

import io
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from charbuild.fsutil import write_bytes_atomic
from charbuild.layout import SAMPLES_DIR
from charbuild.sample_prompts import (
    CPU_SAMPLE_SIZE,
    CPU_SAMPLE_STEPS,
    DEFAULT_SAMPLE_STEPS,
    GUIDANCE_SCALE,
    SamplePrompt,
    round_size,
)

#: Pictures per pipeline call on a GPU, per architecture (a CPU renders all of them in one call):
#: an SDXL call at 1024 px with guidance is already a batch of two large pictures.
GPU_SAMPLE_BATCH = {"sd15": 4, "sdxl": 1}


def sample_settings(setup, prep) -> tuple[int, int]:
    """(size in px, denoising steps): the job's, else the training resolution and 20 steps on a GPU,
    128 px (or the VAE's smaller native size) and 4 steps on a CPU; the size rounded to what the VAE
    and UNet can take."""
    params = setup.job.params
    cuda = prep.device.type == "cuda"
    # on a CPU at most the VAE's native size (the demo model's 64 px: a larger picture it never drew)
    cpu_size = min(CPU_SAMPLE_SIZE, int(getattr(prep.vae.config, "sample_size", CPU_SAMPLE_SIZE) or CPU_SAMPLE_SIZE))
    size = params.sample_size or (int(prep.dataset.datasets[0].resolution[0]) if cuda else cpu_size)
    steps = params.sample_steps or (DEFAULT_SAMPLE_STEPS if cuda else CPU_SAMPLE_STEPS)
    vae_scale = 2 ** (len(prep.vae.config.block_out_channels) - 1)
    unet_scale = 2 ** (len(prep.unet.config.block_out_channels) - 1)
    return round_size(size, vae_scale * unet_scale), int(steps)


class SampleRenderer:
    """Renders the samples of one training into ``<folder>/<subdir>/<step>/`` (``subdir``:
    ``samples``; an exploration's rows: ``explore``, with the row's name as the step)."""

    def __init__(self, setup, prep, samples: tuple[SamplePrompt, ...], folder: str | Path, subdir: str = SAMPLES_DIR):
        from diffusers import DDIMScheduler

        if prep.vae is None:
            raise ValueError("sampling needs the VAE: prepare() keeps it when sample_every is set")
        self.setup, self.prep, self.samples = setup, prep, samples
        self.folder = Path(folder) / subdir
        self.size, self.steps = sample_settings(setup, prep)
        self.sdxl = getattr(prep, "text_encoder_2", None) is not None
        self.scheduler = DDIMScheduler.from_config(prep.noise_scheduler.config)
        self._pipe = None

    def step_folder(self, step: int | str) -> Path:
        """Where the samples of ``step`` go (a sample ``name`` is ``<step folder>/<name>.png``)."""
        return self.folder / str(step)

    def describe(self) -> str:
        return (f"{len(self.samples)} samples of {self.size}x{self.size} px, {self.steps} DDIM steps, "
                f"seeds {self.setup.seed}+i")

    def _pipeline(self):
        if self._pipe is None:
            p = self.prep
            if self.sdxl:
                from diffusers import StableDiffusionXLPipeline

                self._pipe = StableDiffusionXLPipeline(
                    vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2, tokenizer=p.tokenizer,
                    tokenizer_2=p.tokenizer_2, unet=p.unet, scheduler=self.scheduler)
            else:
                from diffusers import StableDiffusionPipeline

                self._pipe = StableDiffusionPipeline(
                    vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                    scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def render(self, step: int | str) -> list[Path]:
        """Render every sample as it looks after ``step`` (or as row ``step`` of an exploration); the files written."""
        import torch
        from tqdm import tqdm

        prep = self.prep
        device = prep.device
        cuda = device.type == "cuda"
        modules = [m for m in (prep.unet, prep.text_encoder, getattr(prep, "text_encoder_2", None)) if m is not None]
        modes = [m.training for m in modules]
        written = []
        with torch.random.fork_rng(devices=[device] if cuda else []), torch.no_grad():
            for m in modules:
                m.eval()
            prep.vae.to(device, torch.float32)
            try:
                batch = GPU_SAMPLE_BATCH["sdxl" if self.sdxl else "sd15"] if cuda else len(self.samples)  # a CPU pays per call, not per picture
                bar = tqdm(total=len(self.samples), desc=f"samples @{step}", unit="img", file=sys.stderr,
                           dynamic_ncols=True, leave=False, mininterval=1.0)
                for k in range(0, len(self.samples), batch):
                    chunk = self.samples[k : k + batch]
                    written += self._render(step, chunk)
                    bar.update(len(chunk))
                bar.close()
            finally:
                prep.vae.to("cpu")
                for m, mode in zip(modules, modes):
                    m.train(mode)
        return written

    def _render(self, step: int, chunk: tuple[SamplePrompt, ...]) -> list[Path]:
        import torch

        prep = self.prep
        pipe = self._pipeline()
        seeds = [s.seed(self.setup.seed) for s in chunk]
        # one generator per picture: its starting noise does not depend on the batch it is in
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = dict(height=self.size, width=self.size, num_inference_steps=self.steps,
                                      guidance_scale=GUIDANCE_SCALE, generator=generators, output_type="latent")
        autocast = (torch.autocast(prep.device.type, dtype=prep.weight_dtype)
                    if prep.weight_dtype != torch.float32 else nullcontext())
        prompts = [s.prompt for s in chunk]
        with autocast:
            if self.sdxl:
                latents = pipe(prompt=prompts, negative_prompt=[""] * len(chunk), **kwargs).images
            else:
                from .conditioning import encode_text

                cond = encode_text(prep.tokenizer, prep.text_encoder, prompts + [""], self.setup.clip_skip, prep.device)
                negative = cond[-1:].expand(len(chunk), -1, -1)
                latents = pipe(prompt_embeds=cond[:-1], negative_prompt_embeds=negative, **kwargs).images
        vae = prep.vae
        latents = latents.to(prep.device, torch.float32) / float(vae.config.scaling_factor)
        written = []
        for sample, seed, latent in zip(chunk, seeds, latents):
            image = vae.decode(latent[None]).sample[0]  # one at a time: a 1024 px decode is large
            written.append(self._save(step, sample, image, seed))
        return written

    def _save(self, step: int, sample: SamplePrompt, image, seed: int) -> Path:
        from PIL import Image, PngImagePlugin

        pixels = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to("cpu").byte().permute(1, 2, 0).numpy()
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", f"{sample.prompt}\nSteps: {self.steps}, Sampler: DDIM, CFG scale: {GUIDANCE_SCALE:g}, "
                                    f"Seed: {seed}, Size: {self.size}x{self.size}")
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG", pnginfo=info)
        target = self.step_folder(step) / f"{sample.name}.png"
        write_bytes_atomic(target, buf.getvalue())
        return target
