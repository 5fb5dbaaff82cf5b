"""A LoRA's block weights from the project's ``[merge]`` settings.

Every place that takes a list of weights (``[merge.presets]``, ``[merge] face/body/group``, a
LoRA's ``merge =``) accepts what ``charbuild merge --weights`` accepts: a preset name, the
LBW comma string ``"0,1,1,…"``, a list of 12/17/20/26 numbers, or (``merge`` only) a block
table. The parsing is :func:`charbuild.lora.blocks.resolve_block_weights`'s, called here.

SDXL projects get SDXL forms (20 values) of the built-in FACE and BODY presets, derived from
the SD1.5 ones block by block (:data:`SD15_BLOCK_OF_SDXL`, docs/sdxl.md); the user's own
``[merge.presets]`` of the same name still win. The user's own SD1.5 lists (17/26 values) in an
SDXL project are applied as the LBW extension applies them, with a warning
(:func:`charbuild.lora.blocks.sd15_list_on_sdxl`), so switching ``base`` alone keeps a project
valid and a merged file equals what LBW shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .lora.blocks import SD15_BLOCK_OF_SDXL, SDXL_FORM_PRESETS, arch_presets, sdxl_form

if TYPE_CHECKING:
    from .model import Lora, Project

__all__ = ["SD15_BLOCK_OF_SDXL", "SDXL_FORM_PRESETS", "arch_presets", "merge_spec", "preset_values",
           "resolve_merge_weights", "sdxl_form"]

def preset_values(value: Any, arch: str) -> list[float]:
    """The weights of a ``[merge.presets]`` entry: a comma string or a list of numbers.

    Returned over every block of ``arch`` (a short list is expanded as LBW does; an SD1.5 list
    on SDXL too), so the preset means the same wherever it is used. Raises ValueError saying
    what is wrong.
    """
    from .lora.blocks import resolve_block_weights

    if isinstance(value, str):
        if "," not in value:
            raise ValueError(f"must be comma-separated numbers like \"0,1,1,…\" or a list of numbers, not {value!r}")
    elif not isinstance(value, list):
        raise ValueError(f"must be comma-separated numbers like \"0,1,1,…\" or a list of numbers, not {value!r}")
    return list(resolve_block_weights(value, arch=arch).values())


def merge_spec(lora: "Lora", merge: Mapping[str, Any]) -> Any:
    """The block-weight spec of ``lora``: its own ``merge``, else its kind's project default."""
    return lora.merge if lora.merge is not None else merge[lora.kind]


def resolve_merge_weights(spec: Any, settings_or_project: "Project | Mapping[str, Any]") -> dict[str, float]:
    """Block weights for a merge spec, with the project's own presets (a Project or its settings)."""
    from .lora.blocks import resolve_block_weights

    if isinstance(settings_or_project, Mapping):
        merge, model = settings_or_project["merge"], settings_or_project["model"]
    else:
        merge, model = settings_or_project.merge, settings_or_project.model
    arch = model["arch"]
    return resolve_block_weights(_stripped(spec), arch=arch, presets=merge.get("presets") or None)


def _stripped(spec: Any) -> Any:
    # as `charbuild merge --weights` strips its text before resolving it
    return spec.strip() if isinstance(spec, str) else spec
