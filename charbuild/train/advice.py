"""Project settings that a backend ignores or that train wrong on a GPU: ``charbuild check``'s warnings (pure).

The defaults are the safe path (an SDXL VAE in fp32, cached latents, PyTorch's attention); these
warnings say why when a project's settings leave it, or set what the chosen backend does not use.
"""

from __future__ import annotations

from typing import Mapping

KeyPath = tuple[str, ...]


def settings_warnings(model: Mapping, trainer: Mapping, training: Mapping) -> list[tuple[str, KeyPath]]:
    """(message, key path) of each warning for the project's ``[model]``, ``[trainer]`` and
    ``[training]`` values (``training`` holds only what the project sets)."""
    backend, arch = trainer.get("backend"), model.get("arch")
    out: list[tuple[str, KeyPath]] = []
    if arch == "sdxl" and training.get("no_half_vae") is False and not model.get("vae"):
        out.append(("no_half_vae = false runs the SDXL VAE in fp16, where it overflows: sd-scripts then replaces the "
                    "NaN latents by zeros and trains on them, the builtin stops; leave no_half_vae out (true for SDXL) "
                    "or give a fixed fp16 VAE as [model] vae", ("training", "no_half_vae")))
    if backend == "builtin":
        if trainer.get("xformers"):
            out.append(("xformers = true is ignored by the builtin trainer: it uses PyTorch's scaled-dot-product "
                        "attention (sd-scripts' --sdpa)", ("trainer", "xformers")))
        if "data_loader_workers" in training:
            out.append(("data_loader_workers is ignored by the builtin trainer: it keeps the cached latents in memory "
                        "and has no data loader", ("training", "data_loader_workers")))
    if backend == "sd-scripts" and training.get("save_every"):
        out.append(("save_every is a builtin-trainer setting: sd-scripts ignores it (give it --save_every_n_steps in "
                    "extra_args; its files stay in the training's temporary folder)", ("training", "save_every")))
    return out
