"""doit task creators: one task per artifact, each depending on exactly what it uses.

| group     | target                                              | depends on                              |
|-----------|-----------------------------------------------------|-----------------------------------------|
| mask      | build/images/<char>/<part>/mask/<stem>.png + .json  | source file (md5), [flatten] rule       |
| image     | build/images/<char>/<part>/<size>/<stem>.png        | source or its mask (md5), size, fill    |
| caption   | …/<stem>.txt                                        | the caption text itself                 |
| dataset   | build/loras/<lora>/dataset.toml                     | the TOML text itself                    |
| preview   | build/loras/<lora>/preview.png                      | largest prepared images + captions (md5)|
| train     | build/loras/<lora>/<variant>/raw.safetensors        | signature sidecar: inputs, params, model|
| merge     | …/<variant>/merged.safetensors                      | raw file (md5), resolved block weights  |
| compress  | …/<variant>/<lora>-<variant>.safetensors            | merged file (md5), compression settings |

Text targets (captions, TOMLs) are computed while tasks load, so a task's
``config_changed`` value *is* its output: a change elsewhere that leaves the
text equal rebuilds nothing. Every action is a module-level function with
plain arguments, so ``doit -n N`` can pickle tasks under any start method.
"""

from __future__ import annotations

import os
from typing import Iterator

from doit.tools import config_changed

from . import layout
from .model import Lora, Part, Project, SourceImage
from .prepared import prepared_sizes, subset_for
from .actions import (TrainUpToDate, compress_action, merge_action, prune_action, train_action,
                      write_text_action)
from .layout import Layout

GROUP_DOCS = {
    "mask": "opaque pictures cut out of their simple background ([flatten]; the report shows them)",
    "image": "prepared pictures: background flattened, one folder per ladder size",
    "caption": "caption .txt per prepared picture, from its angle code",
    "dataset": "dataset TOML per LoRA for kohya-ss sd-scripts",
    "preview": "contact sheet per LoRA: what will be trained",
    "train": "raw LoRA per LoRA and training variant (holds a GPU lock)",
    "merge": "block-weight-merged LoRA (FACE/BODY presets or your own)",
    "compress": "compressed LoRA (SVD rank reduction): the file to use",
    "samples": "the last row of samples of a trained LoRA (with sample_every set), without retraining",
    "candidate": "a LoRA merged with candidate block weights ([merge] explore) and compressed",
    "explore": "samples and scores of the base model, the chosen weights and each candidate",
    "blocks": "per-block analysis: each block of the chosen weights switched off in turn (when asked for)",
    "report": "the project report page build/report/index.html (open it from disk)",
}


# --------------------------------------------------------------------------- path helpers


def prepared_png(part: Part, size: int, img: SourceImage) -> str:
    return f"{layout.image_dir(part.character, part.name, size)}/{img.stem}.png"


def prepared_txt(part: Part, size: int, img: SourceImage) -> str:
    return f"{layout.image_dir(part.character, part.name, size)}/{img.stem}.txt"


def image_task_name(part: Part, img: SourceImage, size: int) -> str:
    return f"{part.character}/{part.name}/{img.stem}@{size}"


# --------------------------------------------------------------------------- the graph


class Graph:
    """All task dicts of a project, grouped by basename, plus the aliases."""

    def __init__(self, project: Project):
        self.project = project
        self.layout = Layout(project.root)
        from .captions import rules_with_overrides

        self.rules = rules_with_overrides(project.captions)
        self.sizes = project.dataset["sizes"]
        self._model_sig: dict | None = None
        self._part_files: dict[str, list] = {}
        self._dataset_texts: dict[str, str] = {}
        #: "<lora>/<variant>" labels to train even when up to date, without the run cache (train --force)
        self.force_train: frozenset[str] = frozenset()
        #: LoRA names whose per-block analysis runs although [merge] explore_blocks is off (charbuild explore --blocks)
        self.analyse: frozenset[str] = frozenset()
        self._masks: dict | None = None
        self._jobs: dict[tuple[str, str], object] = {}  # train_job's, once per variant (train, samples, explore tasks)

    # -- helpers
    def parts(self) -> Iterator[Part]:
        for ch in self.project.characters.values():
            yield ch.face
            yield from ch.outfits.values()

    def part_files(self, part: Part) -> list[tuple[SourceImage, int, str, str]]:
        """(source, size, png, txt) of every prepared picture of ``part`` (computed once)."""
        cached = self._part_files.get(part.key)
        if cached is None:
            cached = []
            for size in self.sizes:
                for img, _ in prepared_sizes(part, size):
                    cached.append((img, size, prepared_png(part, size, img), prepared_txt(part, size, img)))
            self._part_files[part.key] = cached
        return cached

    def picture_task_names(self, part: Part, img: SourceImage | None = None) -> list[str]:
        """The image and caption task names of ``part`` (of one source picture when ``img`` is given)."""
        names = []
        for source, size, _, _ in self.part_files(part):
            if img is None or source is img:
                name = image_task_name(part, source, size)
                names += [f"image:{name}", f"caption:{name}"]
        return names

    def caption(self, part: Part, img: SourceImage) -> str:
        from .captions import caption_text

        return caption_text(img.code, part.lead_tags, self.rules)

    def dataset_text(self, lora: Lora) -> str:
        if lora.name not in self._dataset_texts:
            self._dataset_texts[lora.name] = self._render_dataset(lora)
        return self._dataset_texts[lora.name]

    def _render_dataset(self, lora: Lora) -> str:
        from .dataset_toml import render_dataset_toml

        subsets = [subset for part in lora.parts for size in self.sizes if (subset := subset_for(part, size))]
        return render_dataset_toml(lora.repeats, subsets, self.project.dataset["batch_sizes"], arch=self.project.model["arch"])

    def masks(self) -> dict:
        """The mask of each picture that gets one, by its source path (computed once)."""
        if self._masks is None:
            from .masks import mask_entries

            self._masks = {entry.source: entry for entry in mask_entries(self.project)}
        return self._masks

    # -- groups
    def mask_tasks(self):
        from dataclasses import asdict

        from .masks import mask_action

        yield {"basename": "mask", "name": None, "doc": GROUP_DOCS["mask"]}
        for entry in self.masks().values():
            yield {
                "basename": "mask",
                "name": entry.name,
                "actions": [(mask_action, [entry.source, entry.png, entry.sidecar, asdict(entry.rule)])],
                "file_dep": [entry.source],
                "targets": [entry.png, entry.sidecar],
                "uptodate": [config_changed(entry.rule.signature())],
                "clean": True,
            }

    def image_tasks(self):
        from .images import prepare_image_action

        yield {"basename": "image", "name": None, "doc": GROUP_DOCS["image"]}
        pictures = [(part, f) for part in self.parts() for f in self.part_files(part)]
        masks = self.masks()
        for k, (part, (img, size, png, _)) in enumerate(pictures, 1):
            # the position is for the progress line only: doit does not compare action arguments
            position = (k, len(pictures))
            src = masks[img.rel].png if img.rel in masks else img.rel  # the cut-out, when there is one
            yield {
                "basename": "image",
                "name": image_task_name(part, img, size),
                "actions": [(prepare_image_action, [src, png, size, part.background, position])],
                "file_dep": [src],
                "targets": [png],
                "uptodate": [config_changed({"size": size, "background": part.background, "v": 1})],
                "clean": True,
            }

    def caption_tasks(self):
        yield {"basename": "caption", "name": None, "doc": GROUP_DOCS["caption"]}
        for part in self.parts():
            for img, size, _, txt in self.part_files(part):
                text = self.caption(part, img)
                yield {
                    "basename": "caption",
                    "name": image_task_name(part, img, size),
                    "actions": [(write_text_action, [txt, text])],
                    "targets": [txt],
                    "uptodate": [config_changed(text)],
                    "clean": True,
                }

    def prune_tasks(self):
        expected = []
        for part in self.parts():
            for _, _, png, txt in self.part_files(part):
                expected += [png, txt]
        for entry in self.masks().values():
            expected += [entry.png, entry.sidecar]
        expected.sort()
        yield {
            "basename": "_prune",
            "doc": "remove prepared pictures whose source is gone",
            "actions": [(prune_action, [layout.IMAGES, expected])],
            "uptodate": [config_changed({"files": expected})],
            "verbosity": 2,
        }

    def dataset_tasks(self):
        yield {"basename": "dataset", "name": None, "doc": GROUP_DOCS["dataset"]}
        for lora in self.project.loras.values():
            text = self.dataset_text(lora)
            target = layout.dataset_toml(lora.name)
            yield {
                "basename": "dataset",
                "name": lora.name,
                "actions": [(write_text_action, [target, text])],
                "targets": [target],
                "uptodate": [config_changed(text)],
                "clean": True,
            }

    def preview_entries(self, lora: Lora) -> list[tuple[str, str, str]]:
        """(largest prepared png, code, caption) of every picture of ``lora``."""
        entries = []
        for part in lora.parts:
            largest = {}  # part_files runs from the smallest size up: the last png of a picture wins
            for img, _, png, _ in self.part_files(part):
                largest[img.stem] = png
            for img in part.images:
                if img.stem in largest:
                    entries.append((largest[img.stem], img.code, self.caption(part, img)))
        return entries

    def preview_tasks(self):
        yield {"basename": "preview", "name": None, "doc": GROUP_DOCS["preview"]}
        from .preview import render_preview_action

        for lora in self.project.loras.values():
            entries = self.preview_entries(lora)
            out = layout.preview_png(lora.name)
            yield {
                "basename": "preview",
                "name": lora.name,
                "actions": [(render_preview_action, [entries, out, f"{lora.name} ({lora.kind})"])],
                "file_dep": [e[0] for e in entries],
                "targets": [out],
                "uptodate": [config_changed({"captions": [e[1:] for e in entries], "v": 1})],
                "clean": True,
            }

    def analyse_blocks(self, lora: Lora) -> bool:
        """Whether ``lora`` gets the per-block analysis (``blocks:`` tasks)."""
        return bool(self.project.merge.get("explore_blocks")) or lora.name in self.analyse

    def variants(self, lora: Lora):
        """The training variants of ``lora`` (TrainParams, resolved by the loader)."""
        return list(lora.variant_params)

    def model_signature(self) -> dict:
        if self._model_sig is None:
            from .signature import model_signature

            m = self.project.model
            cache = self.layout.cache_dir
            self._model_sig = {
                "base": model_signature(m["base"], self.project.root, cache),
                "vae": model_signature(m["vae"], self.project.root, cache) if m["vae"] else None,
                "arch": m["arch"],
                "clip_skip": m["clip_skip"],
            }
        return self._model_sig

    def job_specs(self):
        """The project's (ModelSpec, TrainerSpec), as the loader made them."""
        return self.project.model_spec, self.project.trainer_spec

    def train_deps(self, lora: Lora) -> list[str]:
        """The tasks a training of ``lora`` waits for: its dataset TOML and every picture and caption."""
        deps = [f"dataset:{lora.name}"]
        for part in lora.parts:
            deps += self.picture_task_names(part)
        _, upstream = self.continue_from(lora)
        if upstream:
            deps.append(upstream)
        return deps

    def continue_from(self, lora: Lora) -> tuple[str | None, str | None]:
        """(absolute path of the LoRA file ``lora`` continues from, the train task that makes it),
        as the loader resolved its ``continue_from``; ``(None, None)`` when it starts from scratch."""
        return lora.continue_path, lora.continue_task

    def train_job(self, lora: Lora, params):
        """The :class:`~charbuild.train.job.TrainJob` of one variant of ``lora`` (absolute paths;
        made once: the train, samples, explore and blocks tasks all carry it)."""
        key = (lora.name, params.name)
        if key not in self._jobs:
            self._jobs[key] = self._make_train_job(lora, params)
        return self._jobs[key]

    def _make_train_job(self, lora: Lora, params):
        from .dataset_toml import dataset_semantics
        from .train.job import TrainJob, signature_params

        root = self.layout.root
        root_s = str(root) + os.sep  # string joins: this runs for thousands of files on every load
        inputs = []
        for part in lora.parts:
            for _, _, png, txt in self.part_files(part):
                inputs += [root_s + png, root_s + txt]
        model, trainer = self.job_specs()
        vdir = self.layout.variant_dir(lora.name, params.name)
        continue_from, _ = self.continue_from(lora)
        if continue_from:
            inputs.append(continue_from)  # its content is part of the training's signature
        extra = {}
        if trainer.backend == "sd-scripts" and params.network_module == "lycoris.kohya":
            # the modules LyCORIS is told to adapt (sdscripts_command.lycoris_preset_text): before
            # this preset it adapted 4 more (or, from LyCORIS 4, failed)
            extra["lycoris_modules"] = "kohya"
        return TrainJob(
            lora=lora.name,
            kind=lora.kind,
            variant=params.name,
            project_root=str(root),
            dataset_toml=str(self.layout.path(layout.dataset_toml(lora.name))),
            output=str(self.layout.path(layout.raw_lora(lora.name, params.name))),
            variant_dir=str(vdir),
            params=params,
            model=model,
            trainer=trainer,
            keywords=tuple(lora.keywords),
            inputs=tuple(inputs),
            signature_extra={
                "params": signature_params(params),
                "model": self.model_signature(),
                "backend": trainer.backend,
                "dataset": dataset_semantics(self.dataset_text(lora)),
                "keywords": lora.keywords,
                **extra,
            },
            continue_from=continue_from,
            sample_set=self.sample_set(lora, params),
        )

    def sample_set(self, lora: Lora, params) -> tuple[tuple[str, str], ...]:
        """``(name, prompt)`` of the samples a training of ``lora`` renders (none when sampling is off)."""
        if not params.sample_every:
            return ()
        from .sample_prompts import sample_set

        samples = sample_set(lora.kind, lora.keywords, self.rules, params.sample_prompts, lora.sample_members())
        return tuple((s.name, s.prompt) for s in samples)

    def train_tasks(self):
        yield {"basename": "train", "name": None, "doc": GROUP_DOCS["train"]}
        for lora in self.project.loras.values():
            deps = self.train_deps(lora)
            for params in self.variants(lora):
                job = self.train_job(lora, params)
                forced = f"{lora.name}/{params.name}" in self.force_train
                if forced:
                    job = job.with_trainer(run_cache=False)
                yield {
                    "basename": "train",
                    "name": f"{lora.name}/{params.name}",
                    "actions": [(train_action, [job])],
                    "task_dep": deps,
                    "targets": [layout.raw_lora(lora.name, params.name)],
                    "uptodate": [False] if forced else [TrainUpToDate(job)],
                    "verbosity": 2,
                    "io": {"capture": False},
                }

    def merge_tasks(self):
        yield {"basename": "merge", "name": None, "doc": GROUP_DOCS["merge"]}
        for lora in self.project.loras.values():
            weights, note = lora.merge_weights, lora.merge_label
            for params in self.variants(lora):
                raw, merged = layout.raw_lora(lora.name, params.name), layout.merged_lora(lora.name, params.name)
                name = layout.deliverable_stem(lora.name, params.name)
                yield {
                    "basename": "merge",
                    "name": f"{lora.name}/{params.name}",
                    "actions": [(merge_action, [raw, merged, weights, lora.keywords, note, name])],
                    "file_dep": [raw],
                    "targets": [merged],
                    "uptodate": [config_changed({"weights": weights, "keywords": lora.keywords, "note": note,
                                                 "name": name})],
                    "clean": True,
                }

    def compress_settings(self, lora: Lora) -> dict:
        settings = {k: v for k, v in self.project.compress.items()}
        settings.update(lora.compress)
        return settings

    def compress_tasks(self):
        yield {"basename": "compress", "name": None, "doc": GROUP_DOCS["compress"]}
        for lora in self.project.loras.values():
            settings = self.compress_settings(lora)
            for params in self.variants(lora):
                merged = layout.merged_lora(lora.name, params.name)
                out = layout.deliverable_lora(lora.name, params.name)
                yield {
                    "basename": "compress",
                    "name": f"{lora.name}/{params.name}",
                    "actions": [(compress_action, [merged, out, settings])],
                    "file_dep": [merged],
                    "targets": [out],
                    "uptodate": [config_changed(settings)],
                    "clean": True,
                }

    def alias_tasks(self):
        project = self.project
        for ch in project.characters.values():
            deps = []
            for part in [ch.face, *ch.outfits.values()]:
                deps += self.picture_task_names(part)
            for lora in project.loras.values():
                if lora.kind != "group" and lora.characters == [ch.name]:
                    deps += self.lora_deps(lora)
            yield {"basename": ch.name, "actions": None, "task_dep": deps,
                   "doc": f"character {ch.name}: its pictures, captions and LoRAs"}
        for lora in project.loras.values():
            if lora.name in project.characters:
                continue  # the character alias already builds its face LoRA
            yield {"basename": lora.name, "actions": None, "task_dep": self.lora_deps(lora),
                   "doc": f"{lora.kind} LoRA {lora.name}: dataset, preview, training, merge, compress"}

    def lora_deps(self, lora: Lora) -> list[str]:
        deps = [f"dataset:{lora.name}", f"preview:{lora.name}"]
        deps += [f"compress:{lora.name}/{p.name}" for p in self.variants(lora)]
        deps += [f"samples:{lora.name}/{p.name}" for p in self.variants(lora) if p.sample_every]
        if lora.explore_candidates:
            deps += [f"explore:{lora.name}/{p.name}" for p in self.variants(lora)]
        if self.analyse_blocks(lora):
            deps += [f"blocks:{lora.name}/{p.name}" for p in self.variants(lora)]
        return deps

