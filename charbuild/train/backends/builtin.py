"""The builtin backend: ``python -m charbuild.train.builtin JOB.json`` (diffusers + torch, SD1.x and SDXL)."""

from __future__ import annotations

from .protocol import ALL_NETWORKS, Capabilities, PythonModuleBackend, register

BACKEND = register(PythonModuleBackend(
    "builtin",
    "charbuild.train.builtin",
    "charbuild's own trainer (diffusers + torch; GPU when there is one, else CPU)",
    Capabilities(architectures=("sd15", "sdxl"), networks=ALL_NETWORKS, mixed_precisions=("no", "fp16", "bf16")),
))
