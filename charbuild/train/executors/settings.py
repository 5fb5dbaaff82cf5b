"""The ``[trainer]`` keys of the executors: their checkers and the normal form of ``resources``.

``executor``      ``"local"`` (default: this machine, per-GPU file locks) or ``"ray"``.
``ray_address``   where the Ray cluster is: unset = join the one started last on this
                  machine or start a local one; ``"auto"`` = join a running one (error if
                  none); ``"host:6379"`` or ``"ray://host:10001"`` (Ray Client).
``resources``     what one training asks Ray for: ``{ GPU = 1 }`` by default; ``CPU``,
                  ``memory`` (bytes, or a string such as ``"8GB"``) and custom resources
                  may be given.
``retries``       how often a training lost with its worker (node died, worker killed) is
                  started again (default 0). A trainer that exits with an error is not retried.
``shared_model``  ``true``: ``model.base``/``model.vae`` are paths every worker can read
                  (shared storage), nothing is copied; ``false`` (default): the model
                  travels once per node and is kept there by its hash.
``worker_cache``  the folder on each worker node where received models are kept
                  (default: ``<temp dir>/charbuild-models``).

The config loader checks these keys with :data:`EXECUTOR_CHECKS` (the project's checker
vocabulary, :mod:`charbuild.checks`); the defaults are :class:`~charbuild.train.job.TrainerSpec`'s.
Pure: no Ray is imported (:func:`ray_installed` only looks).
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Mapping

from ...checks import describe, is_bool, is_choice, is_int, is_str
from ..job import DEFAULT_RESOURCES

EXECUTORS = ("local", "ray")
INSTALL_HINT = "pip install 'charbuild[ray]'"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: Any) -> int | None:
    """Bytes from a number or a string like ``"8GB"``/``"512MiB"``; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value) if value > 0 else None
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
            return n if n > 0 else None
    return None


def check_resources(value: Any) -> str | None:
    """The checker of ``trainer.resources``: a table of numbers >= 0, ``memory`` a size."""
    if not isinstance(value, dict):
        return f"must be a table such as {{ GPU = 1, CPU = 4, memory = \"16GB\" }}, not {describe(value)}"
    for name, amount in value.items():
        if name == "memory":
            if parse_memory(amount) is None:
                return f"has memory = {amount!r}: give a size in bytes or a string like \"16GB\""
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            return f"has {name} = {amount!r}: each amount must be a number >= 0"
    return None


def normal_resources(value: Mapping[str, Any]) -> dict[str, Any]:
    """Checked ``resources`` with the default GPU count filled in and ``memory`` in bytes."""
    out: dict[str, Any] = dict(DEFAULT_RESOURCES)
    for name, amount in value.items():
        out[name] = parse_memory(amount) if name == "memory" else amount
    return out


#: The checker of each executor key of ``[trainer]``.
EXECUTOR_CHECKS = {
    "executor": is_choice(*EXECUTORS),
    "ray_address": is_str,
    "resources": check_resources,
    "retries": is_int(0),
    "shared_model": is_bool,
    "worker_cache": is_str,
}
EXECUTOR_KEYS = frozenset(EXECUTOR_CHECKS)


def ray_installed() -> bool:
    """Whether ``import ray`` would find Ray, without importing it (config loads must stay fast)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["ray"] is None (blocked)
        return False


def missing_ray_message() -> str:
    """The config error of ``executor = "ray"`` without Ray installed: what to install."""
    return (f"'trainer.executor' = \"ray\" needs Ray, which is not installed: run `{INSTALL_HINT}` "
            "(on this machine and on every worker), or set executor = \"local\"")


def ray_task_options(resources: Mapping[str, Any]) -> dict[str, Any]:
    """``resources`` as keyword arguments of Ray's ``.options()``: num_gpus, num_cpus, memory, resources."""
    opts: dict[str, Any] = {"num_gpus": resources.get("GPU", 0), "num_cpus": resources.get("CPU", 1)}
    if resources.get("memory"):
        opts["memory"] = int(resources["memory"])
    custom = {k: v for k, v in resources.items() if k not in ("GPU", "CPU", "memory")}
    if custom:
        opts["resources"] = custom
    return opts
