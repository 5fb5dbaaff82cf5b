"""The actions of a block-weight exploration (:mod:`charbuild.explore`): candidate files, rendered
rows and their scores, the per-block analysis.

A *row* is one way of applying the LoRA: ``base`` (none of it), ``chosen`` (the deliverable),
a candidate's file, or (the analysis) the raw LoRA with block weights. Every row is rendered with
the same prompts and seeds into ``explore/<row>/`` by the builtin renderer in a process of its own
(:func:`charbuild.train.builtin.lora_samples.render_rows`, holding a GPU lock as a training
does). Next to its pictures each row keeps ``row.json``, the stamp of what it was rendered from
(the file's MD5, the weights, prompts, seeds, size, steps, base model): a row whose stamp holds is
not rendered again, so adding one candidate renders that candidate only. Scoring is cheap and
always redone (:mod:`charbuild.identity`), into ``scores.json`` / ``blocks.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .. import explore, identity
from ..errors import TrainingError, doit_action
from ..fsutil import read_json, write_text_atomic
from ..signature import file_md5
from ..sample_prompts import SamplePrompt
from . import scoring
from .job import TrainJob
from .samples_action import render_options, run_renderer

ROW_STAMP = "row.json"


@doit_action
def candidate_action(raw: str, out: str, weights: dict, keywords: list[str], note: str, name: str,
                     compress: dict) -> dict:
    """The LoRA ``raw`` merged with a candidate's ``weights`` and compressed with the deliverable's
    ``compress`` settings into ``out`` (the merged file only exists meanwhile)."""
    from ..lora.compress import compress_file
    from ..lora.merge import merge_file

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=Path(out).parent) as temp:
        merged = Path(temp) / "merged.safetensors"
        merge_file(raw, merged, weights, keywords=keywords, note=note, output_name=name)
        method = compress["method"]
        report = compress_file(merged, out, method=None if method == "rank" else method,
                               param=None if method == "rank" else compress[method], new_rank=compress["new_rank"],
                               new_conv_rank=compress.get("new_conv_rank"), save_precision=compress["save_precision"],
                               output_name=name)
    return {"size": int(report["size_out"])}


def lora_blocks(path: str | Path, arch: str) -> set[str]:
    """The blocks a LoRA file has modules in (read from its safetensors header; no torch)."""
    from ..lora.blocks import block_of
    from .builtin.checkpoint import read_safetensors_keys

    stems = {key.split(".", 1)[0] for key in read_safetensors_keys(path)}
    return {b for b in (block_of(s, arch) for s in stems) if b is not None}


def _stamp(row: dict, common: dict) -> dict:
    return {"file": file_md5(row["file"]) if row.get("file") else None, "weights": row.get("weights"), **common}


def _current(folder: Path, row: dict, stamp: dict, names: list[str]) -> bool:
    where = folder / row["name"]
    return read_json(where / ROW_STAMP) == stamp and all((where / f"{n}.png").is_file() for n in names)


def render_rows(job: TrainJob, rows: list[dict], samples: tuple[SamplePrompt, ...], folder: str, model_sig: dict) -> int:
    """Render the rows of ``rows`` whose stamp does not hold (one renderer process for all of them);
    the number rendered."""
    options = render_options(job)
    # the stamp: the render options less where the project is, the model by its signature
    common = {**{k: v for k, v in options.items() if k != "project_root"}, "model": model_sig,
              "samples": [[s.name, s.prompt, s.index] for s in samples]}
    names = [s.name for s in samples]
    stamps = {row["name"]: _stamp(row, common) for row in rows}
    stale = [row for row in rows if not _current(Path(folder), row, stamps[row["name"]], names)]
    kept = len(rows) - len(stale)
    if kept:
        print(f"charbuild: {kept} row(s) of {job.label}'s exploration are up to date: kept", file=sys.stderr)
    if not stale:
        return 0
    request = {"rows": stale, "folder": str(Path(folder).parent), "samples": common["samples"], **options}
    run_renderer(job, request, f"the exploration of {job.label}")
    for row in stale:
        write_text_atomic(Path(folder) / row["name"] / ROW_STAMP, json.dumps(stamps[row["name"]], sort_keys=True))
    return len(stale)


def score_row(folder: Path, row: str, refs: dict, leak_names: list[str]) -> dict:
    """Identity and leak of one rendered row (against the training pictures ``refs`` and the
    ``base`` row's pictures of the ``leak_names``)."""
    where = folder / row
    samples = scoring.files_by_name(where.rglob("*.png"), where)
    codes = {m: scoring.code_distances(scoring.member_samples(samples, m), r) for m, r in refs.items()}
    leak = {}
    for name in leak_names:
        mine, base = where / f"{name}.png", folder / explore.BASE_ROW / f"{name}.png"
        if mine.is_file() and base.is_file():
            leak[name] = round(identity.distance(mine, base), 4)
    return explore.row_scores(codes, leak)


def leak_names(samples: tuple[SamplePrompt, ...]) -> list[str]:
    """The samples a leak is measured on: the prompts without trigger words and the neutral one."""
    return [s.name for s in samples if s.name.startswith(scoring.NOTRIGGER_DIR + "/") or s.name == explore.NEUTRAL_NAME]


@doit_action
def explore_action(job: TrainJob, rows: list[dict], samples: tuple[SamplePrompt, ...], info: dict,
                   folder: str, scores_file: str, model_sig: dict) -> bool:
    """Render the exploration's rows that are not up to date, score every row, write ``scores_file``.

    ``rows``: ``base``, ``chosen`` and the candidates (``{"name", "file", "weights"}``, a file
    None for the base model and an every-block-0 candidate); ``info``: what the table shows
    besides scores (each row's spec and weight string, the bound of the best rule).
    """
    missing = [r["file"] for r in rows if r.get("file") and not Path(r["file"]).is_file()]
    if missing:
        raise TrainingError(f"the exploration of {job.label} needs {missing[0]}: build it first", path=missing[0])
    render_rows(job, rows, samples, folder, model_sig)
    refs = scoring.references(job)
    leaks = leak_names(samples)
    scored = {}
    for row in rows:
        scores = score_row(Path(folder), row["name"], refs, leaks)
        scores["size"] = Path(row["file"]).stat().st_size if row.get("file") else 0
        scored[row["name"]] = {**scores, **info["rows"].get(row["name"], {})}
    best, why = explore.best_row(scored, info["max_leak"])
    result = {"lora": job.lora, "variant": job.variant, "rows": scored, "order": [r["name"] for r in rows],
              "best": best, "why": why, "max_leak": info["max_leak"], "blocks": info["blocks"]}
    write_text_atomic(scores_file, json.dumps(result, indent=1, ensure_ascii=False, sort_keys=True))
    print(f"charbuild: explored {job.label}: best {best or 'none'} ({why})", file=sys.stderr)
    return True


@doit_action
def blocks_action(job: TrainJob, chosen: dict, samples: tuple[SamplePrompt, ...], folder: str, out: str,
                  model_sig: dict) -> bool:
    """The per-block analysis: the raw LoRA with the chosen weights, then with each block that
    carries modules and a non-zero chosen weight switched off in turn; identity and leak per row
    and the change per block into ``out``."""
    arch = job.model.arch
    present = lora_blocks(job.output, arch)
    reference = {"name": f"{explore.BLOCKS_ROW}/{explore.CHOSEN_ROW}", "file": job.output, "weights": chosen}
    base = {"name": explore.BASE_ROW, "file": None, "weights": None}
    rows = [base, reference]
    skipped = {}
    for block in chosen:
        if block not in present:
            skipped[block] = "no module"
        elif not chosen[block]:
            skipped[block] = "already 0"
        else:
            rows.append({"name": f"{explore.BLOCKS_ROW}/{block}", "file": job.output,
                         "weights": explore.block_off(chosen, block)})
    render_rows(job, rows, samples, folder, model_sig)
    refs, leaks = scoring.references(job), leak_names(samples)
    scored = {row["name"]: score_row(Path(folder), row["name"], refs, leaks) for row in rows[1:]}
    ref_scores = scored.pop(reference["name"])
    per_block = {r.split("/", 1)[1]: s for r, s in scored.items()}
    result = {"lora": job.lora, "variant": job.variant, "chosen": ref_scores, "blocks": per_block,
              "effects": explore.block_effects(per_block, ref_scores), "skipped": skipped, "order": list(chosen)}
    write_text_atomic(out, json.dumps(result, indent=1, ensure_ascii=False, sort_keys=True))
    return True
