"""The kohya-ss sd-scripts backend: ``train_network.py`` (``sdxl_train_network.py``) through accelerate.

The command itself is :func:`charbuild.train.sdscripts_command.build_command`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..job import TrainJob
from .protocol import ALL_NETWORKS, Capabilities, register


class SdScriptsBackend:
    name = "sd-scripts"
    description = "kohya-ss sd-scripts' train_network.py (a checkout named by trainer.sd_scripts)"
    capabilities = Capabilities(architectures=("sd15", "sdxl"), networks=ALL_NETWORKS,
                                mixed_precisions=("no", "fp16", "bf16"))

    def __repr__(self) -> str:
        return "<backend sd-scripts>"

    def command(self, job: TrainJob, job_file: Path) -> list[str]:
        from ..sdscripts_command import build_command

        return build_command(job)

    def env(self, job: TrainJob, base: Mapping[str, str]) -> dict[str, str]:
        return dict(base)

    def prepare_files(self, job: TrainJob) -> None:
        """The ``--sample_prompts`` file (when the job samples) and the LyCORIS preset (Locon/Loha)."""
        from ..sdscripts_command import write_lycoris_preset, write_sample_prompts

        write_sample_prompts(job)
        write_lycoris_preset(job)

    def collect_outputs(self, job: TrainJob) -> None:
        """sd-scripts' ``sample/`` files as ``samples/<step>/<name>.png``, and ``metrics.jsonl``
        from its TensorBoard losses and the samples' identity."""
        from ..sd_scripts_logs import write_metrics
        from ..sdscripts_command import collect_samples

        collect_samples(job)
        write_metrics(job, Path(job.variant_dir) / "logs", job.title)


BACKEND = register(SdScriptsBackend())
