"""What travels to a worker for one training, and how the job is re-rooted there.

The inputs (prepared pictures and captions) go one object per distinct content (MD5),
put once per driver process and reused by every training that lists the same file;
the dataset TOML travels inline; the base model (and VAE) go one object per file,
keyed by the model's hash, unless ``trainer.shared_model`` says the workers read the
same path. A worker fetches an object only when it needs it (see ``worker.py``) and
trains a copy of the job whose project paths point into its copy of the project
(:func:`job_for_worker`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from ...fsutil import rel_posix
from ...layout import Layout
from ...signature import model_signature
from ..job import TrainJob

#: Variables of the driver's environment that the trainer on the worker gets too: they
#: belong to the build, not to the machine (reproducible timestamps in the LoRA's metadata).
FORWARDED_ENV = ("SOURCE_DATE_EPOCH",)

# the driver's caches (:mod:`.driver`, one process per build): content -> object reference,
# kept alive while it runs, so every training of the build shares one copy of each
_input_refs: dict[str, Any] = {}
_model_refs: dict[tuple[str, str], dict[str, Any]] = {}
#: Bytes this process has put into the object store so far, by kind (the driver logs them).
put_bytes = {"inputs": 0, "model": 0}
# the driver serves its trainings in threads: the first of them puts a file, the others wait for it
_put_lock = threading.Lock()


def project_relative(path: str | Path, root: str | Path) -> str:
    """``path`` as a project-relative POSIX string; ValueError for a path outside the project."""
    rel = rel_posix(path, root)
    if rel == ".." or rel.startswith("../") or PurePosixPath(rel).is_absolute():
        raise ValueError(f"{path} is outside the project {root}")
    return rel


def job_for_worker(job: TrainJob, worker_root: Path, model_paths: Mapping[str, str]) -> TrainJob:
    """``job`` for a worker whose project copy is ``worker_root``.

    Every project path is re-rooted there (same relative layout), the GPU lock folder is
    the copy's; ``model_paths`` gives the worker-side path of ``base``/``vae`` (a key
    absent: unchanged).
    """
    root = job.project_root

    def move(p: str) -> str:
        return str(worker_root / project_relative(p, root))

    return replace(
        job,
        project_root=str(worker_root),
        output=move(job.output),
        variant_dir=move(job.variant_dir),
        dataset_toml=move(job.dataset_toml),
        inputs=tuple(move(p) for p in job.inputs),
        continue_from=move(job.continue_from) if job.continue_from else None,
        model=replace(job.model, **dict(model_paths)),
        trainer=replace(job.trainer, lock_dir=str(Layout(worker_root).locks_dir)),
    )


def model_files(path: Path) -> dict[str, Path]:
    """The files of a model: ``{rel: path}`` of a diffusers folder, or ``{"": path}`` of one file."""
    if path.is_dir():
        return {f.relative_to(path).as_posix(): f for f in sorted(path.rglob("*")) if f.is_file()}
    return {"": path}


def travels(model_value: str | None) -> bool:
    """Whether a ``model.base``/``vae`` value is a model file or folder that must go to the worker.

    Job specs make every model path absolute; a name such as ``"tiny"`` or ``"tiny-sdxl"`` is a
    model the backend generates in the worker's project copy, and a path that does not exist
    here fails on the worker as it would locally.
    """
    return bool(model_value) and Path(model_value).is_absolute() and Path(model_value).exists()


def _model_entry(value: str, layout: Layout) -> dict[str, Any]:
    import ray

    path = Path(value)
    with _put_lock:  # also the hash: concurrent trainings of one model read the file once
        digest = model_signature(str(path), layout.root, layout.cache_dir)["md5"]
        key = (str(path.resolve()), digest)
        if key not in _model_refs:
            refs = {}
            for rel, f in model_files(path).items():
                data = _mapped(f)
                refs[rel] = ray.put(data)
                put_bytes["model"] += len(data)
                del data  # the object store has it: unmap the file
            _model_refs[key] = refs
    return {"hash": digest, "name": path.name, "is_dir": path.is_dir(), "files": _model_refs[key]}


def _mapped(path: Path):
    """The bytes of ``path`` as a read-only uint8 array over a memory map: Ray copies them into
    its object store straight from the page cache, and a worker's ``ray.get`` gives a view of
    the store, so a 7 GB model is never also a 7 GB ``bytes`` object in the driver or a worker."""
    import numpy as np

    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))


def forwarded_env() -> dict[str, str]:
    """This process's values of :data:`FORWARDED_ENV` (a training sends them with its job)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def build_payload(job: TrainJob, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The task argument for ``job`` (its ``output`` in the runner's temp folder): the job, its
    inputs by content, the dataset TOML, the models that must travel, and ``env`` (the
    training's :func:`forwarded_env`; default: this process's)."""
    import ray

    root = Path(job.project_root)
    files: dict[str, tuple[str, Any]] = {}
    for p in job.inputs:
        data = Path(p).read_bytes()
        digest = hashlib.md5(data).hexdigest()
        with _put_lock:
            if digest not in _input_refs:
                _input_refs[digest] = ray.put(data)
                put_bytes["inputs"] += len(data)
        files[project_relative(p, root)] = (digest, _input_refs[digest])
    inline = {project_relative(job.dataset_toml, root): Path(job.dataset_toml).read_bytes()}
    models: dict[str, Any] = {}
    if not job.trainer.shared_model:
        for key in ("base", "vae"):
            value = getattr(job.model, key)
            if travels(value):
                models[key] = _model_entry(value, Layout(root))
    env = dict(forwarded_env() if env is None else env)
    return {"job": job.to_dict(), "files": files, "inline": inline, "models": models,
            "worker_cache": job.trainer.worker_cache, "env": env}


def input_bytes(job: TrainJob) -> int:
    """The size of a training's own inputs (pictures, captions, dataset TOML), as they travel."""
    return sum(Path(p).stat().st_size for p in job.inputs) + Path(job.dataset_toml).stat().st_size
