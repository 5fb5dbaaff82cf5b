"""doit tasks of block-weight exploration (:mod:`charbuild.explore`), for every LoRA variant that
has candidates (``[merge] explore`` or the LoRA's own ``explore``).

| group     | target                                                   | depends on                               |
|-----------|----------------------------------------------------------|------------------------------------------|
| candidate | …/<variant>/explore/<cand>/<lora>-<variant>-<cand>.safetensors | raw file (md5), its weights, compress settings |
| explore   | …/<variant>/explore/<row>/*.png + explore/scores.json    | candidate files, deliverable (md5), prompts, seeds, model |
| blocks    | …/<variant>/explore/blocks/*/*.png + explore/blocks.json | raw file (md5), chosen weights, prompts   |

Candidates are files of their own, so changing the prompts re-renders without merging again,
and nothing here touches the training, the chosen merge or the deliverable. The ``blocks``
tasks (the per-block analysis: a render per block) exist only when asked for: ``[merge]
explore_blocks = true`` or ``charbuild explore LORA --blocks``.
"""

from __future__ import annotations

from doit.tools import config_changed

from . import explore, layout
from .lora.blocks import all_blocks
from .model import Lora

from .tasks import GROUP_DOCS


def explore_samples(graph, lora: Lora) -> tuple:
    """The prompts every row renders (:func:`charbuild.explore.exploration_prompts`) for ``lora``."""
    from .sample_prompts import sample_set

    pictured = {name for part in lora.parts for img in part.images for name in (img.code, f"{part.key}/{img.code}")}
    samples = sample_set(lora.kind, lora.keywords, graph.rules, members=lora.sample_members())
    return explore.exploration_prompts(samples, pictured, lora.keywords)


def _render_config(graph, params, samples) -> dict:
    return {"samples": [[s.name, s.prompt, s.index] for s in samples], "seed": params.seed, "size": params.sample_size,
            "steps": params.sample_steps, "model": graph.model_signature(), "v_prediction": params.v_prediction,
            "zero_terminal_snr": params.zero_terminal_snr}


def candidate_tasks(graph):
    """``candidate:<lora>/<variant>/<cand>``: each non-empty candidate's merged, compressed file."""
    yield {"basename": "candidate", "name": None, "doc": GROUP_DOCS["candidate"]}
    for lora in graph.project.loras.values():
        settings = graph.compress_settings(lora)
        for params in graph.variants(lora):
            raw = layout.raw_lora(lora.name, params.name)
            for cand in lora.explore_candidates:
                if cand.empty:
                    continue
                from .train.explore_action import candidate_action  # here: numpy only where a LoRA explores

                out = layout.candidate_lora(lora.name, params.name, cand.name)
                name = f"{layout.deliverable_stem(lora.name, params.name)}-{cand.name}"
                note = f"explore candidate {cand.spec}"
                yield {
                    "basename": "candidate",
                    "name": f"{lora.name}/{params.name}/{cand.name}",
                    "actions": [(candidate_action, [raw, out, cand.weights, lora.keywords, note, name, settings])],
                    "file_dep": [raw],
                    "targets": [out],
                    "uptodate": [config_changed({"weights": cand.weights, "keywords": lora.keywords, "note": note,
                                                 "name": name, "compress": settings})],
                    "clean": True,
                }


def explore_rows(graph, lora: Lora, params) -> tuple[list[dict], dict]:
    """(the rows of an exploration: base, chosen, each candidate; the table's facts about them)."""
    root = graph.layout.root
    blocks = all_blocks(graph.project.model["arch"])
    rows = [{"name": explore.BASE_ROW, "file": None, "weights": None},
            {"name": explore.CHOSEN_ROW, "file": str(root / layout.deliverable_lora(lora.name, params.name)), "weights": None}]
    facts = {explore.BASE_ROW: {"spec": "the base model alone", "weights": None},
             explore.CHOSEN_ROW: {"spec": lora.merge_label, "weights": explore.weight_string(lora.merge_weights or {}, blocks),
                                  "file": layout.deliverable_lora(lora.name, params.name)}}
    for cand in lora.explore_candidates:
        rel = None if cand.empty else layout.candidate_lora(lora.name, params.name, cand.name)
        rows.append({"name": cand.name, "file": str(root / rel) if rel else None, "weights": None})
        facts[cand.name] = {"spec": cand.spec, "weights": explore.weight_string(cand.weights, blocks), "file": rel,
                            "same_as_chosen": cand.weights == lora.merge_weights}
    return rows, facts


def explore_tasks(graph):
    """``explore:<lora>/<variant>``: the rows rendered (the stale ones only) and scored."""
    yield {"basename": "explore", "name": None, "doc": GROUP_DOCS["explore"]}
    for lora in graph.project.loras.values():
        if not lora.explore_candidates:
            continue
        samples = explore_samples(graph, lora)
        if not samples:
            continue  # no picture of a template code: nothing to score
        from .train.explore_action import explore_action

        for params in graph.variants(lora):
            rows, facts = explore_rows(graph, lora, params)
            folder = str(graph.layout.root / layout.explore_dir(lora.name, params.name))
            scores = layout.explore_scores(lora.name, params.name)
            info = {"rows": facts, "max_leak": graph.project.merge.get("explore_max_leak", explore.DEFAULT_MAX_LEAK),
                    "blocks": all_blocks(graph.project.model["arch"])}
            job = graph.train_job(lora, params)
            pngs = [layout.explore_png(lora.name, params.name, r["name"], s.name) for r in rows for s in samples]
            yield {
                "basename": "explore",
                "name": f"{lora.name}/{params.name}",
                "actions": [(explore_action, [job, rows, samples, info, folder, str(graph.layout.root / scores),
                                              graph.model_signature()])],
                "file_dep": [facts[r["name"]]["file"] for r in rows if r["file"]],
                "targets": [scores, *pngs],
                "uptodate": [config_changed({"rows": [[r["name"], facts[r["name"]]["weights"]] for r in rows],
                                             "max_leak": info["max_leak"], **_render_config(graph, params, samples)})],
                "verbosity": 2,
            }


def blocks_tasks(graph):
    """``blocks:<lora>/<variant>`` for the LoRAs whose per-block analysis was asked for."""
    yield {"basename": "blocks", "name": None, "doc": GROUP_DOCS["blocks"]}
    for lora in graph.project.loras.values():
        if not graph.analyse_blocks(lora):
            continue
        samples = explore_samples(graph, lora)
        if not samples:
            continue
        from .train.explore_action import blocks_action

        for params in graph.variants(lora):
            folder = str(graph.layout.root / layout.explore_dir(lora.name, params.name))
            out = layout.blocks_scores(lora.name, params.name)
            yield {
                "basename": "blocks",
                "name": f"{lora.name}/{params.name}",
                "actions": [(blocks_action, [graph.train_job(lora, params), lora.merge_weights, samples, folder,
                                             str(graph.layout.root / out), graph.model_signature()])],
                "file_dep": [layout.raw_lora(lora.name, params.name)],
                "targets": [out],
                "uptodate": [config_changed({"chosen": lora.merge_weights, **_render_config(graph, params, samples)})],
                "verbosity": 2,
            }
