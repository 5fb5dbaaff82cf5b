"""The one adapter between the report and the rest of charbuild.

Everything the report knows about a project comes through here, from the public names of
``charbuild.model`` (``Project``, ``Lora`` with its resolved variants and merge weights,
``Part``), ``charbuild.prepared`` (``subset_for``), the task ``Graph`` it is handed,
``charbuild.layout`` and ``charbuild.dataset_toml``. When those move, this file is the one to
adapt. What is stale comes from the check :func:`charbuild.report.tasks.report_tasks` is given.

:func:`report_plan` turns a project into the *plan*: plain JSON-ready data (strings, numbers,
lists, dicts; paths relative to the project root, POSIX), which doubles as the doit
``uptodate`` value of the report and as the argument of its action.
"""

from __future__ import annotations


from charbuild.codes import MIRROR_CODES, TEMPLATE_CODES

from .flatten_view import flatten_entries

PLAN_VERSION = 3

#: The fields of a training variant the report shows (the rest are in the trainer's log).
SHOWN_PARAMS = ("network", "dim", "alpha", "conv_dim", "conv_alpha", "lr", "text_encoder_lr", "steps",
                "optimizer", "scheduler", "seed")


def template_grid(kind_letter: str, pictures: dict[str, list[str]], symmetric: bool) -> dict:
    """The 3 × 5 (symmetric) or 3 × 8 angle grid of one part.

    ``pictures`` maps a code to the project-relative paths of its pictures. Returns
    ``{"columns", "rows": [[{"code", "pictures", "template"}]], "missing": [codes], "extra": [codes]}``:
    template codes without a picture are *missing*; a symmetric character's mirror codes
    (h 5-7) widen the grid to 8 columns when it has such pictures, but are never missing.
    """
    template = set(TEMPLATE_CODES[kind_letter])
    if not symmetric:
        template |= set(MIRROR_CODES[kind_letter])
    has_mirrors = any(c in pictures for c in MIRROR_CODES[kind_letter])
    columns = 8 if (not symmetric or has_mirrors) else 5
    rows = [[{"code": f"{kind_letter}{v}{h}", "pictures": list(pictures.get(f"{kind_letter}{v}{h}", [])),
              "template": f"{kind_letter}{v}{h}" in template} for h in range(columns)] for v in range(3)]
    missing = [c["code"] for row in rows for c in row if c["template"] and not c["pictures"]]
    return {"columns": columns, "rows": rows, "missing": missing}


def _dataset_rows(graph, lora) -> list[dict]:
    from charbuild.prepared import subset_for
    from charbuild.dataset_toml import class_resolution, folder_class

    arch = graph.project.model["arch"]
    batch_sizes = graph.project.dataset["batch_sizes"]
    rows = []
    for part in lora.parts:
        for size in graph.sizes:
            subset = subset_for(part, size)
            if subset is None:
                continue
            try:
                wc, hc = folder_class(subset, arch)
                resolution = [class_resolution(wc, arch), class_resolution(hc, arch)]
                batch = batch_sizes.get(f"{wc}_{hc}", 1)
            except ValueError:  # mixed size classes: `charbuild check` reports it; show the row anyway
                resolution, batch = None, None
            rows.append({"folder": subset.image_dir, "part": f"{part.character}/{part.name}", "size": size,
                         "pictures": len(subset.image_sizes), "resolution": resolution, "batch": batch,
                         "flip_aug": subset.flip_aug})
    return rows


def _merge_blocks(graph, lora) -> dict:
    from charbuild.lora.blocks import block_names

    weights = lora.merge_weights
    arch = graph.project.model["arch"]
    short = block_names(arch, 17 if arch == "sd15" else 12)
    full = block_names(arch, 26 if arch == "sd15" else 20)
    # the short list when the blocks it leaves out are all 0 (a plain LoRA touches only those)
    names = short if all(weights.get(b, 0) == 0 for b in full if b not in short) else full
    label = lora.merge_label
    return {"preset": "custom" if label == "custom block weights" else label, "arch": arch,
            "blocks": [[b, float(weights.get(b, 0.0))] for b in names]}


def _explore_entry(graph, lora, params) -> dict | None:
    """Where the variant's exploration is (None when it has no candidates and no per-block analysis)."""
    from charbuild import layout

    if not lora.explore_candidates and not graph.analyse_blocks(lora):
        return None
    return {"dir": layout.explore_dir(lora.name, params.name), "scores": layout.explore_scores(lora.name, params.name),
            "blocks": layout.blocks_scores(lora.name, params.name)}


def report_plan(graph) -> dict:
    """The plan of the report of ``graph``'s project: what it shows and where the files are."""
    from charbuild import layout

    project = graph.project
    characters = []
    for ch in project.characters.values():
        parts = []
        for part in [ch.face, *ch.outfits.values()]:
            pictures: dict[str, list[str]] = {}
            for img in sorted(part.images, key=lambda i: i.rel):
                pictures.setdefault(img.code, []).append(img.rel)
            grid = template_grid("f" if part.kind == "face" else "b", pictures, ch.symmetric)
            parts.append({"name": part.name, "kind": part.kind, "keyword": part.keyword, **grid,
                          "flatten": flatten_entries(graph, part)})
        characters.append({"name": ch.name, "keyword": ch.keyword, "symmetric": ch.symmetric, "parts": parts})
    loras = []
    for lora in project.loras.values():
        variants = []
        for params in graph.variants(lora):
            p = params.to_dict()
            vdir = layout.variant_dir(lora.name, params.name)
            variants.append({
                "name": params.name,
                "dir": vdir,
                "params": {k: p[k] for k in SHOWN_PARAMS if k in p},
                "files": {"raw": layout.raw_lora(lora.name, params.name),
                          "merged": layout.merged_lora(lora.name, params.name),
                          "compressed": layout.deliverable_lora(lora.name, params.name)},
                "explore": _explore_entry(graph, lora, params),
            })
        loras.append({
            "name": lora.name, "kind": lora.kind, "keywords": list(lora.keywords),
            "characters": list(lora.characters), "repeats": lora.repeats,
            "preview": layout.preview_png(lora.name),
            "dataset": _dataset_rows(graph, lora),
            "merge": _merge_blocks(graph, lora),
            "compress": dict(graph.compress_settings(lora)),
            "variants": variants,
        })
    return {"v": PLAN_VERSION, "project": project.root.name, "characters": characters, "loras": loras}


def source_pictures(plan: dict) -> list[str]:
    """Every source picture the plan shows (project-relative), sorted."""
    return sorted({p for ch in plan["characters"] for part in ch["parts"]
                   for row in part["rows"] for cell in row for p in cell["pictures"]})


def lora_task_names(graph) -> list[str]:
    """The doit tasks that make what the report shows of each LoRA (dataset, preview, compress…)."""
    names: list[str] = []
    for lora in graph.project.loras.values():
        names += graph.lora_deps(lora)
    return names
