"""What a training shows besides its LoRA: ``metrics.jsonl`` and ``samples/<step>/<name>.png``.

They are outputs of the training and inputs to nothing (the report reads them, the graph does
not): not in the signature, so they never make a LoRA stale (the last row of samples is also a
``samples:`` target, :mod:`charbuild.train.samples_action`, which renders it for a LoRA without). A trainer writes
them beside ``job.output`` (the runner's temp folder); when the training succeeds
:func:`land` moves them into the variant folder next to the new raw file, replacing those of
the previous training (which described another LoRA). The run cache keeps them beside each
cached LoRA (:func:`store`), and a LoRA restored from it gets its own samples and loss log back
(:func:`restore`); where the cache has none (a cache from before they existed) the old ones are
removed and :func:`restore` says so.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..captions import DEFAULT_RULES
from ..fsutil import replace_file
from ..layout import METRICS_NAME, SAMPLES_DIR
from ..sample_prompts import SamplePrompt, sample_set

if TYPE_CHECKING:
    from .job import TrainJob

#: The names, in a variant folder, of everything :func:`land` moves there.
OBSERVED_NAMES = (METRICS_NAME, SAMPLES_DIR)


def samples_of(job: "TrainJob") -> tuple[SamplePrompt, ...]:
    """The samples ``job`` renders: the graph's set, or the template of its kind with the default rules."""
    if job.sample_set:
        return tuple(SamplePrompt(name, prompt, i) for i, (name, prompt) in enumerate(job.sample_set))
    return sample_set(job.kind, job.keywords, DEFAULT_RULES, job.params.sample_prompts)


def output_folder(job: "TrainJob") -> Path:
    """Where a trainer writes ``metrics.jsonl`` and ``samples/``: the folder of ``job.output``."""
    return Path(job.output).parent


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put(src: Path, target: Path) -> None:
    """Move ``src`` (file or folder) onto ``target``; a folder is swapped in by two renames
    (``os.replace`` cannot replace a non-empty folder, and never one on Windows)."""
    if src.is_dir():
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            replace_file(target, aside / target.name)
        replace_file(src, target)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    else:
        replace_file(src, target)


def land(source: str | Path, variant_dir: str | Path) -> list[str]:
    """Move the observations a trainer left in ``source`` into ``variant_dir``; their names.

    Those of an earlier training that this one did not write are removed: they described
    another LoRA.
    """
    source, variant_dir = Path(source), Path(variant_dir)
    landed = []
    for name in OBSERVED_NAMES:
        src, target = source / name, variant_dir / name
        if src.exists():
            _put(src, target)
            landed.append(name)
        elif target.exists():
            _remove(target)
    return landed


def cache_folder(cached_lora: str | Path) -> Path:
    """The run cache's folder of observations for the cached LoRA file ``cached_lora``."""
    cached_lora = Path(cached_lora)
    return cached_lora.with_name(cached_lora.stem + ".observed")


def store(cached_lora: str | Path, variant_dir: str | Path) -> None:
    """Keep the observations in ``variant_dir`` beside the run cache's ``cached_lora`` (hard links
    where possible). Nothing happens when they are kept already."""
    folder = cache_folder(cached_lora)
    if folder.exists():
        return
    variant_dir = Path(variant_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in OBSERVED_NAMES:
            src = variant_dir / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, copy_function=_link_or_copy)
            elif src.is_file():
                _link_or_copy(src, tmp / name)
        replace_file(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def restore(cached_lora: str | Path, variant_dir: str | Path) -> bool:
    """Put the cached observations of ``cached_lora`` into ``variant_dir``; False (and the old
    ones removed) when the cache holds none."""
    folder = cache_folder(cached_lora)
    variant_dir = Path(variant_dir)
    if not folder.is_dir():
        land(folder, variant_dir)  # nothing to land: removes the previous training's
        return False
    tmp = Path(tempfile.mkdtemp(prefix=".observed-", dir=variant_dir))
    try:
        for name in OBSERVED_NAMES:
            src = folder / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copyfile(src, tmp / name)
        land(tmp, variant_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _link_or_copy(src, dst) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
