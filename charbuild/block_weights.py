"""A LoRA's block weights from the project's ``[merge]`` settings.

Every place that takes a list of weights (``[merge.presets]``, ``[merge] face/body/group``, a
LoRA's ``merge =``) accepts what ``charbuild merge --weights`` accepts: a preset name, the
LBW comma string ``"0,1,1,…"``, a list of 12/17/20/26 numbers, or (``merge`` only) a block
table. The parsing is :func:`charbuild.lora.blocks.resolve_block_weights`'s, called here.

SDXL projects get SDXL forms (20 values) of the built-in FACE and BODY presets, derived from
the SD1.5 ones block by block (:data:`SD15_BLOCK_OF_SDXL`, docs/sdxl.md); the user's own
``[merge.presets]`` of the same name still win. The user's SD1.5 lists (17/26 values) in an
SDXL project are taken in their SDXL form the same way, so switching ``base`` alone keeps them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .model import Lora, Project

#: For each SDXL block, the SD1.5 block that does the same job: the same channel width at the
#: same fraction of the image (320 channels at 1/8, 640 at 1/16, 1280 at 1/32). SD1.5's
#: deepest level (IN09-IN11, OUT00-OUT02: 1280 channels at 1/64, no attention) has no SDXL
#: counterpart; its values are dropped.
SD15_BLOCK_OF_SDXL: dict[str, str] = {
    "BASE": "BASE", "IN00": "IN00",
    **{f"IN{i:02d}": f"IN{i:02d}" for i in range(1, 9)},  # 320: IN01-02, down IN03, 640: IN04-05, down IN06, 1280: IN07-08
    "M00": "M00",
    **{f"OUT{i:02d}": f"OUT{i + 3:02d}" for i in range(9)},  # 1280: OUT00-02 = SD OUT03-05, 640: OUT03-05, 320: OUT06-08
}
#: The built-in presets that have an SDXL form (the rest are uniform or LBW's own 17-value lists).
SDXL_FORM_PRESETS = ("FACE", "BODY")


def sdxl_form(sd15_weights: Mapping[str, float]) -> list[float]:
    """The 20 SDXL block weights (BASE, IN00-IN08, M00, OUT00-OUT08) for SD1.5 ``{block: weight}``."""
    from .lora.blocks import SDXL_20

    return [float(sd15_weights[SD15_BLOCK_OF_SDXL[block]]) for block in SDXL_20]


def arch_presets(arch: str, presets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The presets a weights spec of an ``arch`` project resolves with: for SDXL the SDXL forms of
    FACE and BODY, then the user's ``presets`` (which win)."""
    table: dict[str, Any] = {}
    if arch == "sdxl":
        from .lora.blocks import BUILTIN_PRESETS, resolve_block_weights

        for name in SDXL_FORM_PRESETS:
            table[name] = sdxl_form(resolve_block_weights(BUILTIN_PRESETS[name], arch="sd15"))
    table.update(presets or {})
    return table


#: Lengths of SD1.5 weight lists (LBW's 17, all 26 blocks): an SDXL project takes them in their SDXL form.
SD15_LENGTHS = (17, 26)


def _sd15_list_in_sdxl(value: Any, arch: str) -> list[float] | None:
    """The SDXL form of an SD1.5 weight list (17/26 values, a list or comma string) given to an
    SDXL project, derived block by block as FACE and BODY are; None for anything else. So a
    project's presets and weights stay valid when its base model switches to SDXL."""
    if arch != "sdxl":
        return None
    if isinstance(value, str) and "," in value:
        count = len(value.split(","))
    elif isinstance(value, list):
        count = len(value)
    else:
        return None
    if count not in SD15_LENGTHS:
        return None
    from .lora.blocks import resolve_block_weights

    return sdxl_form(resolve_block_weights(value, arch="sd15"))


def preset_values(value: Any, arch: str) -> list[float]:
    """The weights of a ``[merge.presets]`` entry: a comma string or a list of numbers.

    Returned over every block of ``arch`` (a short list is expanded as LBW does), so the
    preset means the same wherever it is used; an SD1.5 list in an SDXL project is taken in its
    SDXL form (:func:`sdxl_form`). Raises ValueError saying what is wrong.
    """
    from .lora.blocks import resolve_block_weights

    if isinstance(value, str):
        if "," not in value:
            raise ValueError(f"must be comma-separated numbers like \"0,1,1,…\" or a list of numbers, not {value!r}")
    elif not isinstance(value, list):
        raise ValueError(f"must be comma-separated numbers like \"0,1,1,…\" or a list of numbers, not {value!r}")
    converted = _sd15_list_in_sdxl(value, arch)
    if converted is not None:
        return converted
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
    spec = _sd15_list_in_sdxl(_stripped(spec), arch) or _stripped(spec)
    return resolve_block_weights(spec, arch=arch, presets=arch_presets(arch, merge.get("presets")) or None)


def _stripped(spec: Any) -> Any:
    # as `charbuild merge --weights` strips its text before resolving it
    return spec.strip() if isinstance(spec, str) else spec
