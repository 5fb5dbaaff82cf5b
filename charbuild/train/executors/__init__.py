"""Where a stale training runs besides this machine: on a Ray cluster (``[trainer] executor = "ray"``).

The runner (:mod:`charbuild.train.runner`) registers :data:`RAY` as the launcher of
``executor = "ray"``. It asks for no local GPU lock (``local_gpu = False``: Ray schedules
the GPUs); the driver side is :mod:`.ray`, the worker side :mod:`.worker`, what travels
:mod:`.payload`. Importing this package imports no Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import EXECUTORS

if TYPE_CHECKING:
    from ..job import TrainJob
    from ..launch import Launch


class RayLauncher:
    """The launcher of ``executor = "ray"``: one Ray task per training (:func:`.ray.launch_on_ray`)."""

    name = "ray"
    #: The runner takes no GPU lock of this machine: Ray assigns a GPU on some node.
    local_gpu = False

    def __repr__(self) -> str:
        return "<launcher ray>"

    def __call__(self, launch: "Launch") -> int:
        from .ray import launch_on_ray

        return launch_on_ray(launch)

    def dry_run_lines(self, job: "TrainJob") -> list[str]:
        """Where ``job`` would run: the resources it asks for and the nodes that fit."""
        from .ray import dry_run_lines

        return dry_run_lines(job)


RAY = RayLauncher()

__all__ = ["EXECUTORS", "RAY", "RayLauncher"]
