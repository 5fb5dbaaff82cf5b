"""The ``samples:<lora>/<variant>`` targets and their action: samples of a trained LoRA without
training it again.

A training renders samples when ``sample_every`` is set; this target renders its last row
(``samples/<steps>/<name>.png``) for a raw LoRA that exists already: turned on after the
training, or prompts changed. Samples the training itself wrote for these prompts and seeds
are kept as they are (the action reads each PNG's ``parameters`` text). Rendering runs in a
process of its own (:mod:`charbuild.train.builtin.lora_samples`, the build process never
imports torch) holding a GPU lock of ``[trainer] gpus``, as a training does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import layout
from ..errors import TrainingError, doit_action
from ..fsutil import write_text_atomic
from .gpulock import gpu_lease
from .hardware import training_slots
from .process import child_env
from .job import TrainJob
from .observed import samples_of

#: The module that renders samples of an existing LoRA (``python -m MODULE REQUEST.json``): the
#: builtin renderer on the base model, whatever backend trained the LoRA, except the fake
#: backend's stand-in LoRAs, which no model can render (tests, demos).
RENDERERS = {"fake": "charbuild.train.fake_samples"}
DEFAULT_RENDERER = "charbuild.train.builtin.lora_samples"


def sample_targets(job: TrainJob) -> list[Path]:
    """The files a ``samples:`` target writes: ``<variant>/samples/<steps>/<name>.png``."""
    folder = Path(job.variant_dir) / "samples" / str(int(job.params.steps))
    return [folder / f"{s.name}.png" for s in samples_of(job)]


def _prompt_and_seed(png: Path) -> tuple[str, str] | None:
    """(prompt, ``Seed: N``) from a sample's ``parameters`` text; None when unreadable."""
    from PIL import Image

    try:
        with Image.open(png) as im:
            text = im.text.get("parameters", "") if hasattr(im, "text") else ""
    except OSError:
        return None
    prompt, _, rest = text.partition("\n")
    seed = next((part.strip() for part in rest.split(",") if part.strip().startswith("Seed:")), "")
    return prompt, seed


def current(job: TrainJob) -> bool:
    """Whether every sample of ``job``'s last step is there with its prompt and seed."""
    for sample, png in zip(samples_of(job), sample_targets(job)):
        if not png.is_file() or _prompt_and_seed(png) != (sample.prompt, f"Seed: {sample.seed(job.params.seed)}"):
            return False
    return True


def render_options(job: TrainJob) -> dict:
    """What every render request of ``job`` carries: its model, seed, project root, sample size and
    steps, and the training's prediction options (the renderer's keyword arguments)."""
    p = job.params
    return {"model": job.model.to_dict(), "seed": int(p.seed), "project_root": job.project_root,
            "size": p.sample_size, "steps": p.sample_steps, "v_prediction": bool(p.v_prediction),
            "zero_terminal_snr": bool(p.zero_terminal_snr)}


def request(job: TrainJob) -> dict:
    """The JSON request of :mod:`charbuild.train.builtin.lora_samples` for ``job``'s raw LoRA."""
    return {"lora_file": job.output, "folder": job.variant_dir, "step": int(job.params.steps),
            "samples": [[s.name, s.prompt, s.index] for s in samples_of(job)], **render_options(job)}


@doit_action
def samples_action(job: TrainJob) -> bool:
    """Render the last row of samples of ``job``'s raw LoRA (unless the training's are there)."""
    if current(job):
        print(f"charbuild: samples of {job.label} at step {int(job.params.steps)} are the training's: kept",
              file=sys.stderr)
        return True
    if not Path(job.output).is_file():
        raise TrainingError(f"no trained LoRA to render samples of: train {job.label} first", path=job.output)
    run_renderer(job, request(job), f"the samples of {job.label}")
    return True


def run_renderer(job: TrainJob, request: dict, what: str) -> None:
    """Run the renderer of ``job``'s backend on ``request`` in a process of its own, holding a GPU
    lock of ``[trainer] gpus`` (a CPU slot without a GPU) as a training does; TrainingError when it
    fails (``what`` rendered)."""
    slots = training_slots(job.trainer.gpus, job.trainer.cpu_trainings)
    with gpu_lease(job.trainer.lock_dir, slots, poll=job.trainer.lock_poll) as lease:
        Path(job.variant_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".samples-", dir=job.variant_dir) as temp:
            request_file = Path(temp) / "request.json"
            write_text_atomic(request_file, json.dumps(request, ensure_ascii=False))
            env = child_env(lease.gpu, job.trainer.cpu_trainings)
            module = RENDERERS.get(job.trainer.backend, DEFAULT_RENDERER)
            rc = subprocess.call([sys.executable, "-m", module, str(request_file)], cwd=job.project_root, env=env)
    if rc != 0:
        raise TrainingError(f"rendering {what} failed (exit status {rc}; its output is above)", path=job.output)


def samples_tasks(graph, doc: str):
    """``samples:<lora>/<variant>`` of ``graph`` (a :class:`charbuild.tasks.Graph`) for every variant
    that samples (``sample_every``): the last row of samples of its raw LoRA, rendered when missing
    or when the prompts change, without retraining (a row the training wrote is kept). ``doc``:
    the group's line in ``doit list``."""
    from doit.tools import config_changed

    yield {"basename": "samples", "name": None, "doc": doc}
    for lora in graph.project.loras.values():
        for params in graph.variants(lora):
            if not params.sample_every:
                continue
            sample_set = graph.sample_set(lora, params)
            yield {
                "basename": "samples",
                "name": f"{lora.name}/{params.name}",
                "actions": [(samples_action, [graph.train_job(lora, params)])],
                "file_dep": [layout.raw_lora(lora.name, params.name)],
                "targets": [layout.sample_png(lora.name, params.name, params.steps, name) for name, _ in sample_set],
                "uptodate": [config_changed({"samples": sample_set, "seed": params.seed, "model": graph.model_signature(),
                                             "size": params.sample_size, "steps": params.sample_steps})],
                "verbosity": 2,
            }
