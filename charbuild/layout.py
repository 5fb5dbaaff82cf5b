"""The on-disk layout of a project's ``build/`` folder: the one module that spells its paths.

============================================  ===========================================
path (relative to the project root)           what
============================================  ===========================================
``build/images/<char>/<part>/<size>/``        prepared pictures ``<stem>.png`` + ``.txt``
``build/images/<char>/<part>/mask/``          opaque pictures cut out: ``<stem>.png`` (RGBA,
                                              the mask as alpha) + ``<stem>.json`` (verdict)
``build/loras/<lora>/dataset.toml``           the LoRA's dataset TOML
``build/loras/<lora>/preview.png``            its contact sheet
``build/loras/<lora>/<variant>/``             one training variant: ``raw.safetensors``
                                              (+ ``raw.json`` signature), ``merged``,
                                              ``<lora>-<variant>.safetensors`` (the
                                              deliverable), ``train.log``, ``logs/``,
                                              ``metrics.jsonl`` (loss log) and
                                              ``samples/<step>/<name>.png``: what the
                                              training showed (never an input)
``build/locks/``                              build lock, GPU locks
``build/cache/``                              model hashes; ``trained/``: the run cache
``build/models/``                             generated models (the ``tiny`` demo model)
``build/report/``                             the project report page (``index.html`` + assets)
``build/.doit.db``                            doit's state database
============================================  ===========================================

Two spellings of every path: the task graph uses POSIX strings relative to the root
(``"build/loras/krnk/dataset.toml"``: what doit stores as targets and dependencies, so
they must not change when the project moves), everything else absolute
:class:`~pathlib.Path` objects from :class:`Layout`, whose root is made absolute once.
"""

from __future__ import annotations

from pathlib import Path

BUILD = "build"
IMAGES = f"{BUILD}/images"
LORAS = f"{BUILD}/loras"
LOCKS = f"{BUILD}/locks"
CACHE = f"{BUILD}/cache"
MODELS = f"{BUILD}/models"
DOIT_DB = f"{BUILD}/.doit.db"
RUN_CACHE = f"{CACHE}/trained"
REPORT = f"{BUILD}/report"

RAW_NAME = "raw.safetensors"
MERGED_NAME = "merged.safetensors"
LOG_NAME = "train.log"
METRICS_NAME = "metrics.jsonl"  # the format: charbuild/report/metrics.py
SAMPLES_DIR = "samples"
SAVES_DIR = "saves"  # save_every's LoRAs of a training before its end (builtin trainer)
MASK_DIR = "mask"
EXPLORE_DIR = "explore"  # block-weight candidates, their samples and scores (charbuild/explore.py)


# ---------------------------------------------------------------- relative POSIX strings (the graph's)


def image_dir(character: str, part: str, size: int) -> str:
    """The prepared-image folder of a character's part at a ladder size."""
    return f"{IMAGES}/{character}/{part}/{size}"


def mask_dir(character: str, part: str) -> str:
    """The cut-out folder of a character's part (beside its ladder-size folders)."""
    return f"{IMAGES}/{character}/{part}/{MASK_DIR}"


def mask_png(character: str, part: str, stem: str) -> str:
    """``…/mask/<stem>.png``: the picture cut out of its background, its mask as alpha."""
    return f"{mask_dir(character, part)}/{stem}.png"


def mask_verdict(character: str, part: str, stem: str) -> str:
    """``…/mask/<stem>.json``: how it was cut out and whether the method was sure."""
    return f"{mask_dir(character, part)}/{stem}.json"


def lora_dir(lora: str) -> str:
    """``build/loras/<lora>``."""
    return f"{LORAS}/{lora}"


def dataset_toml(lora: str) -> str:
    return f"{lora_dir(lora)}/dataset.toml"


def preview_png(lora: str) -> str:
    return f"{lora_dir(lora)}/preview.png"


def variant_dir(lora: str, variant: str) -> str:
    """``build/loras/<lora>/<variant>``: every file of one training variant."""
    return f"{lora_dir(lora)}/{variant}"


def raw_lora(lora: str, variant: str) -> str:
    return f"{variant_dir(lora, variant)}/{RAW_NAME}"


def merged_lora(lora: str, variant: str) -> str:
    return f"{variant_dir(lora, variant)}/{MERGED_NAME}"


def deliverable_stem(lora: str, variant: str) -> str:
    """``<lora>-<variant>``: the deliverable's file stem, and the name written inside every LoRA
    file of that variant (``ss_output_name``, ``modelspec.title``: web UIs use it as the alias)."""
    return f"{lora}-{variant}"


def deliverable_lora(lora: str, variant: str) -> str:
    """``build/loras/<lora>/<variant>/<lora>-<variant>.safetensors``: the file to use."""
    return f"{variant_dir(lora, variant)}/{deliverable_stem(lora, variant)}.safetensors"


def metrics_jsonl(lora: str, variant: str) -> str:
    """``<variant>/metrics.jsonl``: training and validation loss per step (written by the trainer)."""
    return f"{variant_dir(lora, variant)}/{METRICS_NAME}"


def samples_dir(lora: str, variant: str) -> str:
    """``<variant>/samples``: ``<step>/<name>.png`` rendered during the training."""
    return f"{variant_dir(lora, variant)}/{SAMPLES_DIR}"


def sample_png(lora: str, variant: str, step: int, name: str) -> str:
    """``<variant>/samples/<step>/<name>.png`` (``name``: an angle code, or ``p1``… for a user prompt)."""
    return f"{samples_dir(lora, variant)}/{int(step)}/{name}.png"


def explore_dir(lora: str, variant: str) -> str:
    """``<variant>/explore``: candidate block weights, their samples (``<row>/<name>.png``) and scores."""
    return f"{variant_dir(lora, variant)}/{EXPLORE_DIR}"


def candidate_lora(lora: str, variant: str, candidate: str) -> str:
    """``<variant>/explore/<candidate>/<lora>-<variant>-<candidate>.safetensors``: the LoRA merged
    with a candidate's weights and compressed as the deliverable is."""
    return f"{explore_dir(lora, variant)}/{candidate}/{deliverable_stem(lora, variant)}-{candidate}.safetensors"


def explore_png(lora: str, variant: str, row: str, name: str) -> str:
    """``<variant>/explore/<row>/<name>.png``: a sample of an exploration row (``base``, ``chosen``,
    a candidate, ``blocks/<block>``); ``name`` a code, ``notrigger/<code>`` or ``neutral``."""
    return f"{explore_dir(lora, variant)}/{row}/{name}.png"


def explore_scores(lora: str, variant: str) -> str:
    """``<variant>/explore/scores.json``: every row's identity, leak and size, and the best one."""
    return f"{explore_dir(lora, variant)}/scores.json"


def blocks_scores(lora: str, variant: str) -> str:
    """``<variant>/explore/blocks.json``: the per-block analysis (each block off in turn)."""
    return f"{explore_dir(lora, variant)}/blocks.json"


# ---------------------------------------------------------------- absolute paths


class Layout:
    """The absolute paths of one project's build folder (``root`` is resolved once, here)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Layout({str(self.root)!r})"

    def path(self, rel: str) -> Path:
        """The absolute path of a graph path (a POSIX string relative to the root)."""
        return self.root / rel

    @property
    def build_dir(self) -> Path:
        return self.root / BUILD

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES

    @property
    def loras_dir(self) -> Path:
        """``build/loras``: also the TensorBoard log root (each variant has ``logs/``)."""
        return self.root / LORAS

    @property
    def locks_dir(self) -> Path:
        return self.root / LOCKS

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE

    @property
    def run_cache_dir(self) -> Path:
        """Finished trainings kept by content key (safe to delete at any time)."""
        return self.root / RUN_CACHE

    @property
    def models_dir(self) -> Path:
        return self.root / MODELS

    @property
    def doit_db(self) -> Path:
        return self.root / DOIT_DB

    def variant_dir(self, lora: str, variant: str) -> Path:
        return self.root / variant_dir(lora, variant)

    def train_log(self, lora: str, variant: str) -> Path:
        return self.variant_dir(lora, variant) / LOG_NAME
