"""The fake backend: ``python -m charbuild.train.fake_trainer JOB.json``, a quick stand-in for tests and demos."""

from __future__ import annotations

from .protocol import ALL_NETWORKS, Capabilities, PythonModuleBackend, register

BACKEND = register(PythonModuleBackend(
    "fake",
    "charbuild.train.fake_trainer",
    "a stand-in that trains nothing and writes a small valid LoRA (tests, demos)",
    Capabilities(architectures=("sd15", "sdxl"), networks=ALL_NETWORKS, mixed_precisions=("no", "fp16", "bf16")),
))
