"""What a training backend must provide, and the registry the runner finds backends in.

A backend is an object with (see :class:`Backend`):

- ``name`` (what ``[trainer] backend`` says) and ``description`` (its metadata: one line);
- ``capabilities``: the architectures, network types and mixed precisions it can train;
- ``command(job, job_file)``: the argument list of the process that trains ``job`` (the job
  file holds ``job.to_json()``; the job's ``output`` already points into the runner's
  temporary folder, where the process must leave ``<job.output>``);
- ``env(job, base)``: the process environment, from ``base`` (the runner's environment with
  ``CUDA_VISIBLE_DEVICES`` set).

Every backend runs as a process: the runner owns locking, logs, stopping and the result's
move into place, so a backend is only "how to start it". To add one, write a module with a
backend object and :func:`register` it (the three built in are registered below); the task
graph never changes. Importing this package stays cheap: no torch.
"""

from __future__ import annotations

from .protocol import (
    ALL_NETWORKS,
    Backend,
    Capabilities,
    PythonModuleBackend,
    backend_names,
    check_capabilities,
    collect_outputs,
    get_backend,
    prepare_files,
    register,
)
from . import builtin as _builtin, fake as _fake, sdscripts as _sdscripts  # they register themselves

__all__ = ["ALL_NETWORKS", "BUILTIN", "Backend", "Capabilities", "FAKE", "PythonModuleBackend", "SD_SCRIPTS",
           "backend_names", "check_capabilities", "collect_outputs", "get_backend", "prepare_files", "register"]

BUILTIN, SD_SCRIPTS, FAKE = _builtin.BACKEND, _sdscripts.BACKEND, _fake.BACKEND
