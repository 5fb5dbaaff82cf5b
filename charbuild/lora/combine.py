"""Combine several LoRAs into one file, each at its own ratio, without cross-terms.

Exact (``rank=None``): per module the inputs' ranks are concatenated. Each input's
``ratio · alpha_i / r_i`` is folded into its up factor and the output alpha is the total rank
(scale 1), so ``ΔW = Σ ratio_i · ΔW_i`` exactly. LoCon Tucker modules are folded into plain
down factors first (exact); LoHa/LoKr inputs need ``rank``.

Re-factorised (``rank=N``): per module the sum ``Σ ratio_i · ΔW_i`` is cut to rank N by its SVD
(``up = U·S``, ``down = Vh``, alpha = N): what sd-scripts' ``svd_merge_lora.py`` does; lossy where
the sum has rank above N. Any input format. Where every input of a module is LoRA/LoCon or plain
LoHa (as Khatri-Rao factors), the SVD comes from the concatenated factors (compress's r × r
route, no full delta: seconds instead of minutes for big conv layers); otherwise (LoKr, Tucker
LoHa, wide LoHa ranks) from the summed full deltas.

Block weights per input (``block_weights``, as sd-scripts' ``sdxl_merge_lora.py --lbws``): each
input's ratio is multiplied, module by module, by its block's weight (LBW's rules, as
:func:`charbuild.lora.merge.merge_lora` applies them: block-less modules ×1, a short list's
unnamed blocks 0), so the result is ``ΔW = Σ ratio_i · w_i(block) · ΔW_i``, what
``sdxl_merge_lora.py --sd_model`` adds to a checkpoint. Where sd-scripts' own LoRA-to-LoRA merge
differs (it scales up *and* down by ``√(alpha_i/alpha_0)·ratio``, so ratios act squared, and
its ``--concat`` keeps the first alpha over the summed rank), we keep the checkpoint semantics;
its ``--lbws`` also leaves a short list's unnamed blocks at 1 and gives ``time_embed``/``label_emb``
the IN00 weight, where LBW (and we) give 0 and ×1 (docs/sdxl.md).

Inputs must share one architecture; a module present in only some inputs is taken from those.
The output is kohya LoRA in the first input's dtype. Its metadata (see
:mod:`charbuild.lora.provenance`) keeps only what every input agrees on (base model, arch…),
records each input in ``charbuild.combine_inputs`` (JSON: file, sshs_model_hash, ratio, and its
own output name, training comment with any resize history, merge weights, combine inputs) and
in ``charbuild.combine`` (JSON list of ``[file, ratio]``), lists them in
``modelspec.merged_from`` and takes its name (``ss_output_name``, ``modelspec.title``) from
``output_name`` or, as ``sdxl_merge_lora.py`` does, from the output file's stem.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping, Sequence

import torch

from charbuild.errors import LoraFileError
from charbuild.lora.compress import loha_factors, target_shape
from charbuild.lora.svd import pad_to_rank, resize_factors, resize_full
from charbuild.lora.blocks import resolve_block_weights
from charbuild.lora.io import LoraFile, load_lora, save_lora
from charbuild.lora.merge import module_weight
from charbuild.lora.parallel import map_modules
from charbuild.lora.provenance import combine_metadata, input_record, model_hash, with_output_name


def _scaled_factors(lora: LoraFile, stem: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down), 2-D float32, with ``up @ down`` the module's delta (scale included): LoRA/LoCon
    (Tucker folded) and plain LoHa (Khatri-Rao factors, see compress); None for the rest."""
    m = lora.modules[stem]
    if m.kind == "loha":
        return loha_factors(m)
    if m.kind != "lora":
        return None
    up, down = m.factors()
    return up * m.scale, down


def _combine_module(present: list[tuple[LoraFile, float]], stem: str, rank: int | None):
    """(up, down) in float32, 2-D, of one module's combination (see the module docstring)."""
    factors = [_scaled_factors(lora, stem) for lora, _ in present]
    if all(f is not None for f in factors):
        up = torch.cat([f[0] * ratio for f, (_, ratio) in zip(factors, present)], dim=1)
        down = torch.cat([f[1] for f in factors], dim=0)
        if rank is None:
            return up, down
        up, down, *_ = resize_factors(up, down, 1.0, rank, None, 0.0)
    else:
        up, down, *_ = resize_full(sum(lora.modules[stem].delta() * ratio for lora, ratio in present), rank, None, 0.0)
    return pad_to_rank(up, down, rank)  # an all-zero module comes back at rank 1: keep the requested rank


def combine_loras(
    loras: Sequence[tuple[LoraFile, float]],
    *,
    rank: int | None = None,
    progress: bool = False,
    workers: int | None = None,
    block_weights: Sequence[Mapping[str, float] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Pure core of :func:`combine_files`: the combined tensors (float32, kohya LoRA keys).

    ``block_weights``: one ``{block: w}`` (or None: all 1) per input; a module's share of an
    input is ``ratio · w(block)``, and an input whose block weight is 0 leaves that module out.
    Modules are combined on ``workers`` threads (default ``torch.get_num_threads()``).
    """
    from tqdm import tqdm

    if not loras:
        raise ValueError("nothing to combine")
    arch = loras[0][0].arch
    for lora, _ in loras:
        if lora.arch != arch:
            raise LoraFileError(f"cannot combine a {lora.arch} LoRA with a {arch} one", lora.path)
        if rank is None and lora.format in ("loha", "lokr"):
            raise LoraFileError(
                f"{lora.format} modules cannot be combined exactly by concatenating ranks; give a rank "
                "(--rank N) to re-factorise the summed deltas by SVD",
                lora.path,
            )
    weights = list(block_weights) if block_weights is not None else [None] * len(loras)
    if len(weights) != len(loras):
        raise ValueError(f"{len(weights)} block-weight specs for {len(loras)} inputs: give one per input")
    stems = sorted({s for lora, _ in loras for s in lora.modules})
    plans = []
    for stem in stems:
        present = [(lora, ratio, w) for (lora, ratio), w in zip(loras, weights) if stem in lora.modules]
        shapes = {target_shape(lora.modules[stem], arch) for lora, _, _ in present}
        if len(shapes) != 1:
            files = ", ".join(str(lora.path) for lora, _, _ in present)
            raise LoraFileError(f"{stem}: the inputs adapt layers of different shapes {sorted(shapes)} ({files})")
        shares = []
        for lora, ratio, w in present:
            block_w = module_weight(stem, arch, w)[1] if w else 1.0
            if block_w != 0.0:  # as merge: a block at weight 0 drops the input's module
                shares.append((lora, ratio * block_w))
        if shares:
            plans.append((stem, shares, shapes.pop()))
    if not plans:
        raise LoraFileError("every module has block weight 0 in every input: the combination would be empty")

    def combine(plan):
        stem, present, _ = plan
        with torch.no_grad():
            return _combine_module(present, stem, rank)

    out: dict[str, torch.Tensor] = {}
    with contextlib.closing(map_modules(combine, plans, workers)) as results:
        for (stem, _, shape), (up, down) in tqdm(
            zip(plans, results), total=len(plans), disable=not progress, desc="combine", unit="module"
        ):
            r = up.shape[1]
            if len(shape) == 4:
                up, down = up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
            out[f"{stem}.lora_up.weight"] = up.contiguous()
            out[f"{stem}.lora_down.weight"] = down.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(r))
    return out


def combine_files(
    inputs: Sequence[tuple[str | Path, float]],
    dst: str | Path,
    *,
    rank: int | None = None,
    progress: bool = False,
    workers: int | None = None,
    output_name: str | None = None,
    block_weights: Sequence[object | None] | None = None,
    presets: Mapping[str, Sequence[float]] | None = None,
) -> dict:
    """Combine ``inputs`` [(path, ratio), …] into ``dst`` (exact, or SVD to ``rank``); return a report.

    ``output_name`` (default: the stem of ``dst``) is written as ``ss_output_name`` and
    ``modelspec.title``. ``block_weights``: one spec per input (anything
    :func:`~charbuild.lora.blocks.resolve_block_weights` takes, with ``presets``; None for none),
    resolved for the files' arch and recorded per input.
    """
    if not inputs:
        raise LoraFileError("combine needs at least one input LoRA")
    if rank is not None and rank < 1:
        raise LoraFileError(f"rank must be at least 1, got {rank}")
    try:
        with_output_name({}, output_name)
    except ValueError as exc:
        raise LoraFileError(str(exc), dst) from None
    loras = [(load_lora(path), float(ratio)) for path, ratio in inputs]
    specs = list(block_weights) if block_weights is not None else [None] * len(loras)
    if len(specs) != len(loras):
        raise LoraFileError(f"{len(specs)} block-weight specs for {len(loras)} inputs: give one per input", dst)
    resolved: list[dict[str, float] | None] = []
    for (path, _), (lora, _), spec in zip(inputs, loras, specs):
        try:
            resolved.append(None if spec is None else resolve_block_weights(spec, lora.arch, presets))  # type: ignore[arg-type]
        except ValueError as exc:
            raise LoraFileError(f"block weights: {exc}", path) from None
    tensors = combine_loras(loras, rank=rank, progress=progress, workers=workers, block_weights=resolved)
    first = loras[0][0]
    dtype = next((t.dtype for t in first.tensors.values() if t.is_floating_point()), torch.float32)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    ranks = sorted({int(v.shape[0]) for k, v in tensors.items() if k.endswith("lora_down.weight")})
    mode = "exact" if rank is None else f"svd rank {rank}"
    records = [
        input_record(Path(path).name, model_hash(path), r, lora.metadata, block_weights=w)
        for (path, _), (lora, r), w in zip(inputs, loras, resolved)
    ]
    metadata = combine_metadata(
        records,
        [lora.metadata for lora, _ in loras],
        mode=mode,
        dim=str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        arch=first.arch,
        output_name=Path(dst).stem if output_name is None else output_name,
    )
    save_lora(dst, tensors, metadata)
    return {
        "inputs": [[str(p), float(r)] for p, r in inputs],
        "dst": str(dst),
        "mode": mode,
        "modules": sum(1 for k in tensors if k.endswith(".alpha")),
        "ranks": ranks,
        "arch": first.arch,
    }
