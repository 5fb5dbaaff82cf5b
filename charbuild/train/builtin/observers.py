"""What watches a builtin training and what it leaves: the progress bar and TensorBoard, samples,
validation, step-0 baselines and identity (:class:`Observers`, called after every step), saves
before the end (``save_every``) and the result file (:func:`write_result`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable


from ..job import TrainJob
from .metadata import build_metadata
from .setup import (Prepared, Setup, _timestamp, note)



def _bar(total: int, desc: str, unit: str):
    """A tqdm progress bar on stderr (the runner relays its ``\\r`` updates byte for byte)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


class Progress:
    """The step callback of a run: tqdm bar (loss, ETA), TensorBoard scalars, step end times."""

    def __init__(self, setup: Setup):
        self.bar = _bar(setup.steps, "steps", "step")
        self.writer = _summary_writer(setup.job)
        self.loss_sum = 0.0
        self.finite_steps = 0
        self.started = time.time()
        self.step_ends: list[float] = []
        self.val_loss: float | None = None

    def __call__(self, step: int, loss: float, lrs: list) -> None:
        self.step_ends.append(time.time())
        if math.isfinite(loss):  # a skipped step's inf/nan would spoil the average
            self.loss_sum += loss
            self.finite_steps += 1
        avg = self.loss_sum / max(self.finite_steps, 1)
        self.bar.update(1)
        extra = {} if self.val_loss is None else {"val": f"{self.val_loss:.4f}"}
        self.bar.set_postfix(loss=f"{loss:.4f}", avg=f"{avg:.4f}", **extra, refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("loss/current", loss, step)
            self.writer.add_scalar("loss/average", avg, step)
            if lrs:
                self.writer.add_scalar("lr/unet", lrs[0], step)
            if len(lrs) > 1:
                self.writer.add_scalar("lr/textencoder", lrs[1], step)

    def validation(self, step: int, val_loss: float) -> None:
        """Log a validation loss beside the training loss."""
        if self.writer is not None:
            self.writer.add_scalar("loss/validation", val_loss, step)
        self.val_loss = val_loss

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Observers:
    """What watches a training without changing it: ``metrics.jsonl``, validation loss, samples.

    All of it is written beside ``setup.output`` (the runner's temp folder), see
    :mod:`charbuild.train.observed`. Validation runs before the first step (step 0), every
    ``validation_every`` steps and after the last; samples every ``sample_every`` steps and
    after the last.
    """

    def __init__(self, setup: Setup, prep: Prepared, progress: Progress):
        from charbuild.train.metrics import MetricsWriter
        from charbuild.train.observed import output_folder, samples_of

        from .identity_watch import IdentityWatch

        self.setup, self.prep, self.progress = setup, prep, progress
        params = setup.job.params
        folder = output_folder(setup.job)
        self.metrics = MetricsWriter(folder)
        self.validation = self.samples = self.identity = None
        self.sample_every, self.validation_every = params.sample_every, params.validation_every
        self.save_every = params.save_every
        if self.save_every:
            note(f"saving the LoRA every {self.save_every} steps into {saves_folder(setup.job)}")
        if self.validation_every:
            from .validation import ValidationSet

            items = prep.dataset.items
            self.validation = ValidationSet.build(prep.latents, [it.caption for it in items],
                                                  int(prep.noise_scheduler.config.num_train_timesteps), setup.seed,
                                                  sizes_hw=[(it.bucket[1], it.bucket[0]) for it in items])
            note(f"validation: {len(self.validation)} fixed cases (every picture at fixed timesteps and noise), "
                 f"every {self.validation_every} steps")
        if self.sample_every:
            from .samples import SampleRenderer

            self.samples = SampleRenderer(setup, prep, samples_of(setup.job), folder)
            note(f"samples: {self.samples.describe()}, every {self.sample_every} steps and at the end")
            self.identity = IdentityWatch(setup, prep, self.samples, folder, self.metrics)
            note(self.identity.describe())

    def start(self) -> None:
        if self.validation is not None:
            self._survive_oom("validation", 0, self._validate)
        if self.identity is not None:
            self._survive_oom("step-0 samples", 0, self._baseline)

    def __call__(self, step: int, loss: float, lrs: list) -> None:
        from charbuild.sample_prompts import sample_steps_due

        from .device import peak_memory

        self.metrics.step(step, loss, lrs[0] if lrs else None, extra=peak_memory(self.prep.precision))
        last = step == self.setup.steps
        if self.save_every and step % self.save_every == 0 and not last:
            path = save_intermediate(self.setup, self.prep, step)
            note(f"step {step}: saved {path}")
        if self.validation is not None and (step % self.validation_every == 0 or last):
            self._survive_oom("validation", step, self._validate)
        if self.samples is not None and sample_steps_due(step, self.sample_every, self.setup.steps):
            self._survive_oom("samples", step, self._render)

    def _baseline(self, _step: int = 0) -> None:
        with self._encoders_on_device():
            self.identity.baseline()

    def _render(self, step: int) -> None:
        t0 = time.time()
        with self._encoders_on_device():
            written = self.samples.render(step)
            if self.identity is not None:
                self.identity.after(step, written, step == self.setup.steps)
        note(f"step {step}: {len(written)} samples in {time.time() - t0:.1f}s")

    def _survive_oom(self, what: str, step: int, run: Callable[[int], None]) -> None:
        """``run(step)``; a GPU (or CPU) out-of-memory error in it is a warning, not the end of the
        training: samples and validation only watch it. The memory they held is given back."""
        from .device import free_memory, out_of_memory_errors

        try:
            run(step)
        except out_of_memory_errors() as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            note(f"warning: step {step}: {what} skipped, out of memory ({first}); the training goes on")
            free_memory(self.prep.precision)

    @contextlib.contextmanager
    def _encoders_on_device(self, captions: list[str] | None = None):
        """The text encoders where the UNet is, for as long as a sample or validation needs them:
        with ``cache_text_encoder_outputs`` they wait on the CPU in fp32 (as sd-scripts keeps them).
        ``captions``: what will be encoded; when the frozen encoders' outputs of all of them are
        cached, the encoders stay where they are."""
        import torch

        p = self.prep
        if captions is not None and not p.train_text_encoder and all(c in p.text_cache for c in captions):
            yield
            return
        parked = [te for te in (p.text_encoder, p.text_encoder_2)
                  if te is not None and (next(te.parameters()).device, next(te.parameters()).dtype)
                  != (p.device, p.weight_dtype)]
        for te in parked:
            te.to(p.device, p.weight_dtype)
        try:
            yield
        finally:
            for te in parked:
                te.to("cpu", torch.float32)

    def _validate(self, step: int) -> None:
        with self._encoders_on_device([c.caption for c in self.validation.cases]):
            self._validate_here(step)

    def _validate_here(self, step: int) -> None:
        from .device import autocast as device_autocast
        from .validation import training_predict

        p = self.prep
        autocast = device_autocast(p.precision) if p.precision.half else None
        modules = [m for m in (p.unet, p.text_encoder, getattr(p, "text_encoder_2", None)) if m is not None]
        value = self.validation.evaluate(training_predict(self.setup, p), p.noise_scheduler, p.device, modules, autocast)
        self.metrics.validation(step, value)
        self.progress.validation(step, value)

    def close(self) -> None:
        self.metrics.close()


def write_result(setup: Setup, prep: Prepared, output: Path | None = None, steps_done: int | None = None) -> int:
    """Write the trained network to ``output`` (default ``setup.output``; kohya keys, sd-scripts
    metadata, ``steps_done`` of ``setup.steps`` for a save before the end); its tensor count."""
    import torch

    from charbuild.lora.io import save_lora

    tensors = prep.network.kohya_state_dict(getattr(torch, setup.save_dtype))
    metadata = build_metadata(setup, prep.model_name, prep.dataset, prep.optimizer_desc, prep.prior_steps,
                              arch=prep.arch, loss=prep.loss, steps_done=steps_done)
    save_lora(output or setup.output, tensors, metadata)
    return len(tensors)


def saves_folder(job: TrainJob) -> Path:
    """Where ``save_every`` puts its files: ``<variant_dir>/saves/`` (outside the runner's temp
    folder, so a training that fails or is stopped leaves them to continue from)."""
    from charbuild.layout import SAVES_DIR

    return Path(job.variant_dir) / SAVES_DIR


def save_intermediate(setup: Setup, prep: Prepared, step: int) -> Path:
    """Save the LoRA as it is after ``step`` as ``saves/<lora>-<variant>-step00000500.safetensors``
    (sd-scripts' ``--save_every_n_steps`` name); its metadata counts ``step`` steps, so
    ``continue_from`` on it adds the steps still to go. Written atomically."""
    path = saves_folder(setup.job) / f"{setup.job.title}-step{step:08d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_result(setup, prep, path, steps_done=step)
    return path


def _current_lrs(optimizer, lr_scheduler) -> list[float]:
    try:
        if lr_scheduler is not None:
            return [float(x) for x in lr_scheduler.get_last_lr()]
        return [float(g["lr"]) for g in optimizer.param_groups]
    except (TypeError, KeyError, AttributeError, IndexError):
        return []


def _summary_writer(job: TrainJob):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        note("tensorboard is not installed: no TensorBoard logs")
        return None
    stamp = datetime.fromtimestamp(_timestamp()).strftime("%Y%m%d%H%M%S")
    return SummaryWriter(log_dir=str(Path(job.variant_dir) / "logs" / f"{job.lora}-{job.variant}-{stamp}" / "network_train"))
