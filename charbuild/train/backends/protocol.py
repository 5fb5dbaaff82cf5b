"""The Backend protocol, its capabilities, and the registry backends put themselves in.

See :mod:`charbuild.train.backends` for what a backend provides.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

from ...checks import did_you_mean
from ...errors import TrainingError
from ..job import TrainJob

#: Network types of the variant grammar (:data:`charbuild.train.variants.NETWORKS`).
ALL_NETWORKS = ("Lora3x3", "Lora1x1", "Locon", "Loha")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can train."""

    architectures: tuple[str, ...]
    networks: tuple[str, ...]
    mixed_precisions: tuple[str, ...]

    def problems(self, job: TrainJob) -> list[str]:
        """Why this backend cannot train ``job`` (empty when it can)."""
        out = []
        if job.model.arch not in self.architectures:
            out.append(f"architecture {job.model.arch!r} (it trains {', '.join(self.architectures)})")
        if job.params.network not in self.networks:
            out.append(f"network {job.params.network!r} (it trains {', '.join(self.networks)})")
        if job.params.mixed_precision not in self.mixed_precisions:
            out.append(f"mixed_precision {job.params.mixed_precision!r} (it knows {', '.join(self.mixed_precisions)})")
        return out


@runtime_checkable
class Backend(Protocol):
    """The interface of a training backend (see the module docstring)."""

    name: str
    description: str
    capabilities: Capabilities

    def command(self, job: TrainJob, job_file: Path) -> list[str]: ...

    def env(self, job: TrainJob, base: Mapping[str, str]) -> dict[str, str]: ...

    # Optional (see :func:`prepare_files` and :func:`collect_outputs`, which the launchers call
    # where the trainer runs): ``prepare_files(job)`` writes files the command names into the
    # temp folder (sd-scripts' sample prompt file) before the start; ``collect_outputs(job)``
    # turns the trainer's own sample files into ``samples/<step>/<name>.png`` beside
    # ``job.output`` after a successful run (charbuild.train.observed lands them).


class PythonModuleBackend:
    """A backend that is a module of this package run with this interpreter: ``python -m MODULE JOB``."""

    def __init__(self, name: str, module: str, description: str, capabilities: Capabilities):
        self.name = name
        self.module = module
        self.description = description
        self.capabilities = capabilities

    def __repr__(self) -> str:
        return f"<backend {self.name}: python -m {self.module}>"

    def command(self, job: TrainJob, job_file: Path) -> list[str]:
        return [sys.executable, "-m", self.module, str(job_file)]

    def env(self, job: TrainJob, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with this charbuild first on ``PYTHONPATH`` (the child imports the same code)."""
        env = dict(base)
        pkg_parent = str(Path(__file__).resolve().parents[3])
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + old if old else "")
        return env


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (a later one of the same name replaces it); returns it."""
    _REGISTRY[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; TrainingError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TrainingError(
            f"unknown trainer backend {name!r}{did_you_mean(name, _REGISTRY)}: expected one of {', '.join(_REGISTRY)}"
        ) from None


def prepare_files(backend: Backend, job: TrainJob) -> None:
    """The backend's optional ``prepare_files(job)``: before its command starts, on the machine it runs on."""
    hook = getattr(backend, "prepare_files", None)
    if hook is not None:
        hook(job)


def collect_outputs(backend: Backend, job: TrainJob) -> None:
    """The backend's optional ``collect_outputs(job)``: after a successful run, where it ran."""
    hook = getattr(backend, "collect_outputs", None)
    if hook is not None:
        hook(job)


def check_capabilities(backend: Backend, job: TrainJob) -> None:
    """Raise TrainingError when ``backend`` cannot train ``job``."""
    problems = backend.capabilities.problems(job)
    if problems:
        raise TrainingError(f"backend {backend.name!r} cannot train {job.label}: " + "; ".join(problems))
