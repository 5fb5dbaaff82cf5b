"""Rank reduction of LoRA files, choosing ranks exactly as sd-scripts' ``networks/resize_lora.py``.

How each module's rank is chosen and its factors are cut is :mod:`charbuild.lora.svd`'s
(the rank rules, capped at ``new_rank``/``new_conv_rank`` and at the module's own rank).

LoCon Tucker modules (``lora_mid``) are folded exactly into a plain (r, in, k, k) down first.
LoHa and LoKr modules are converted to kohya LoRA through the SVD of their full delta (scale
included, so the output alpha equals the new rank); that conversion keeps only the top
singular directions, so it is lossy wherever the rank is cut. A plain LoHa delta is the product
of Khatri-Rao factors of rank r1·r2 (:func:`loha_factors`), so while that rank is well below
the layer's sides it takes the factor route above instead of a full SVD (same result).

Metadata as resize_lora.py writes it: ``ss_training_comment`` prefixed with
``Dynamic resize with <method>: <param> from <old dim>; `` and ``ss_network_dim`` /
``ss_network_alpha`` = ``"Dynamic"`` (fixed rank: ``dimension is resized from <old> to <new>[ (conv:
N)]; ``, ``ss_network_dim`` = new rank, ``ss_network_alpha`` = the alpha of the last module in
key order), fresh sshs hashes at save.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from charbuild.errors import OptionError
from charbuild.lora.io import (
    LoraFile,
    LoraModule,
    build_modules_unchecked,
    header_room,
    load_lora,
    stream_lora,
)
from charbuild.lora.keysets import layer_shapes
from charbuild.lora.parallel import map_modules
from charbuild.lora.provenance import with_output_name
from charbuild.lora.svd import METHODS, RANK_RULES, resize_factors, resize_full

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "fp32": torch.float32}


def _scale_of(module: LoraModule) -> float | torch.Tensor:
    """alpha / r the way resize_lora.py computes it (a float32 tensor; 1.0 without alpha)."""
    if module.alpha is None:
        return 1.0
    return torch.tensor(module.alpha, dtype=torch.float32) / module.rank


def target_shape(module: LoraModule, arch: str) -> tuple[int, ...]:
    """The adapted layer's weight shape: from the factors, or the SD key set for LoHa/LoKr."""
    p = module.params
    if module.kind == "lora":
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        if down.dim() == 2:
            return (up.shape[0], down.shape[1])
        kernel = p["lora_mid.weight"].shape[2:] if "lora_mid.weight" in p else down.shape[2:]
        return (up.shape[0], down.shape[1], *kernel)
    known = layer_shapes(arch).get(module.stem)
    out, n = _flat_shape(module)
    if known is not None and known[0] == out and math.prod(known[1:]) == n:
        return known
    for key in ("hada_t1", "lokr_t2", "lokr_w2"):
        t = p.get(key)
        if t is not None and t.dim() == 4:
            kh, kw = t.shape[2], t.shape[3]
            return (out, n // (kh * kw), kh, kw)
    return (out, n)


def _flat_shape(module: LoraModule) -> tuple[int, int]:
    p = module.params
    if module.kind == "loha":
        a, b, t = p["hada_w1_a"], p["hada_w1_b"], p.get("hada_t1")
        if t is None:
            return a.shape[0], math.prod(b.shape[1:])
        return a.shape[1], b.shape[1] * t.shape[2] * t.shape[3]
    w1 = p.get("lokr_w1")
    a1, c1 = (w1.shape[0], w1.shape[1]) if w1 is not None else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
        b2, d2 = w2.shape[0], math.prod(w2.shape[1:])
    elif "lokr_t2" in p:
        t = p["lokr_t2"]
        b2, d2 = p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1] * t.shape[2] * t.shape[3]
    else:
        b2, d2 = p["lokr_w2_a"].shape[0], math.prod(p["lokr_w2_b"].shape[1:])
    return a1 * b2, c1 * d2


def loha_factors(module: LoraModule):
    """A LoHa module's delta as one product ``up @ down`` (scale included), or None.

    ``(A1 B1) ⊙ (A2 B2) = (A1 ⊙ᵣ A2)(B1 ⊙꜀ B2)``: row-wise and column-wise Khatri-Rao products
    of rank r1·r2, exact (products of fp16 values are exact in float32). Worth it while r1·r2
    is well below the layer's sides; Tucker LoHa and wide ranks take the full-delta SVD.
    """
    p = module.params
    if module.kind != "loha" or "hada_t1" in p or "hada_t2" in p:
        return None
    a1, a2 = p["hada_w1_a"].float(), p["hada_w2_a"].float()
    b1, b2 = (p[k].float().reshape(p[k].shape[0], -1) for k in ("hada_w1_b", "hada_w2_b"))
    r = a1.shape[1] * a2.shape[1]
    if 2 * r > min(a1.shape[0], b1.shape[1]):
        return None
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], r) * module.scale
    down = (b1[:, None, :] * b2[None, :, :]).reshape(r, b1.shape[1])
    return up, down


def _compress_module(module: LoraModule, arch: str, new_rank: int, conv_rank: int, method, param, rank_rule, dtype):
    """One module resized: (its output tensors, its report entry)."""
    shape = target_shape(module, arch)
    conv = len(shape) == 4
    cap = conv_rank if conv else new_rank
    if module.kind == "lora":
        cap = min(cap, module.rank)  # never above the module's own rank (deviation from resize_lora.py)
        new_up, new_down, alpha, k, stats = resize_factors(*module.factors(), _scale_of(module), cap, method, param, rank_rule)
    elif (factors := loha_factors(module)) is not None:
        new_up, new_down, alpha, k, stats = resize_factors(*factors, 1.0, cap, method, param, rank_rule)
    else:
        new_up, new_down, alpha, k, stats = resize_full(module.delta(), cap, method, param, rank_rule)
    if conv:
        new_up = new_up.reshape(shape[0], k, 1, 1)
        new_down = new_down.reshape(k, *shape[1:])
    stem = module.stem
    tensors = {
        f"{stem}.lora_down.weight": new_down.to(dtype).contiguous(),
        f"{stem}.lora_up.weight": new_up.to(dtype).contiguous(),
        f"{stem}.alpha": torch.tensor(alpha).to(dtype),
    }
    entry = {"old_rank": module.rank, "new_rank": k, "new_alpha": alpha, **stats}
    return tensors, entry


def _options(method, param, new_rank, new_conv_rank, save_precision, rank_rule) -> dict:
    """The checked options (ValueError naming what is wrong)."""
    if method == "rank":
        method = None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: sv_ratio, sv_fro, sv_cumulative, rank")
    if save_precision not in PRECISIONS:
        raise ValueError(f"unknown save precision {save_precision!r}; valid: fp16, bf16, float")
    if rank_rule not in RANK_RULES:
        raise ValueError(f"unknown rank rule {rank_rule!r}; valid: {', '.join(RANK_RULES)}")
    if method is not None and not param > 0:
        raise ValueError(f"{method} needs a positive parameter, got {param}")
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise ValueError("new_rank and new_conv_rank must be at least 1")
    return {
        "method": method,
        "param": param,
        "new_rank": new_rank,
        "conv_rank": new_conv_rank if new_conv_rank is not None else new_rank,
        "save_precision": save_precision,
        "rank_rule": rank_rule,
    }


def _stems(lora: LoraFile) -> list[str]:
    # file order: '.' sorts before every character of a stem, so stem order is key order
    return sorted(lora.modules, key=lambda s: f"{s}.lora_down.weight")


def _is_converted(module: LoraModule) -> bool:
    return module.kind != "lora" or "lora_mid.weight" in module.params


def _resize_all(lora: LoraFile, opts: dict, sink, *, workers: int | None, progress: bool, verbose: bool) -> dict:
    """Resize every module, handing its output tensors to ``sink(key, tensor)`` in file order.

    Returns the per-module report entries by stem. ``verbose`` prints them and the averages.
    """
    from tqdm import tqdm

    stems = _stems(lora)
    dtype = PRECISIONS[opts["save_precision"]]
    def resize(stem: str):
        with torch.no_grad():
            return _compress_module(
                lora.modules[stem], lora.arch, opts["new_rank"], opts["conv_rank"], opts["method"], opts["param"],
                opts["rank_rule"], dtype,
            )  # fmt: skip

    entries: dict[str, dict] = {}
    with contextlib.closing(map_modules(resize, stems, workers)) as results:  # a failing sink stops the workers
        for stem, (tensors, entry) in tqdm(
            zip(stems, results), total=len(stems), disable=not progress, desc="compress", unit="module"
        ):
            for key in sorted(tensors):
                sink(key, tensors[key])
            entries[stem] = entry
            if verbose:
                line = (
                    f"{stem:75} | sum(S) retained: {entry['sum_retained']:.1%}, "
                    f"fro retained: {entry['fro_retained']:.1%}, max(S) ratio: {entry['max_ratio']:0.1f}"
                )
                if opts["method"]:
                    line += f", dynamic | dim: {entry['new_rank']}, alpha: {entry['new_alpha']}"
                tqdm.write(line)
    if verbose:
        means = _means(entries)
        print(f"Average Frobenius norm retention: {means['mean_fro_retained']:.2%} | std: {means['std_fro_retained']:0.3f}")
        print(f"Average sum(S) retention: {means['mean_sum_retained']:.2%}")
    return entries


def _means(entries: dict[str, dict]) -> dict[str, float]:
    fro = [m["fro_retained"] for m in entries.values() if not math.isnan(m["fro_retained"])]
    sums = [m["sum_retained"] for m in entries.values() if not math.isnan(m["sum_retained"])]
    mean_fro = sum(fro) / len(fro) if fro else float("nan")
    mean_sum = sum(sums) / len(sums) if sums else float("nan")
    std_fro = math.sqrt(sum((f - mean_fro) ** 2 for f in fro) / len(fro)) if fro else float("nan")
    return {"mean_sum_retained": mean_sum, "mean_fro_retained": mean_fro, "std_fro_retained": std_fro,
            "mean_retained": (mean_sum + mean_fro) / 2}  # fmt: skip


def _old_dim(lora: LoraFile) -> int:
    return max((m.rank for m in lora.modules.values()), default=0)


def _last_alpha(entries: dict[str, dict]):
    """The alpha of the last module in key order (entries are in that order), as resize_lora.py reports it."""
    return next(reversed(entries.values()))["new_alpha"] if entries else None


def _result_metadata(lora: LoraFile, opts: dict, last_alpha, output_name: str | None = None) -> dict[str, str]:
    """The output's metadata as resize_lora.py writes it (``last_alpha``: of the last module); the
    name keys kept, or set to ``output_name``."""
    method, old_dim = opts["method"], _old_dim(lora)
    metadata = dict(lora.metadata)
    comment = metadata.get("ss_training_comment", "")
    if method:
        metadata["ss_training_comment"] = f"Dynamic resize with {method}: {opts['param']} from {old_dim}; {comment}"
        metadata["ss_network_dim"] = "Dynamic"
        metadata["ss_network_alpha"] = "Dynamic"
    else:
        new_rank, conv_rank = opts["new_rank"], opts["conv_rank"]
        conv_desc = "" if new_rank == conv_rank else f" (conv: {conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}{conv_desc}; {comment}"
        metadata["ss_network_dim"] = str(new_rank)
        metadata["ss_network_alpha"] = str(last_alpha)
    if any(_is_converted(m) for m in lora.modules.values()):
        metadata["ss_network_module"] = "networks.lora"
        metadata.pop("ss_network_args", None)
        metadata["charbuild.converted_from"] = lora.format
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        metadata.pop(key, None)
    return with_output_name(metadata, output_name)


def _report(lora: LoraFile, opts: dict, entries: dict[str, dict]) -> dict:
    return {
        "method": opts["method"] or "rank",
        "param": opts["param"],
        "new_rank": opts["new_rank"],
        "new_conv_rank": opts["conv_rank"],
        "save_precision": opts["save_precision"],
        "rank_rule": opts["rank_rule"],
        "old_dim": _old_dim(lora),
        "modules": entries,
        **_means(entries),
        "converted": [stem for stem in entries if _is_converted(lora.modules[stem])],
    }


def compress_lora(
    lora: LoraFile,
    *,
    method: str | None = "sv_ratio",
    param: float = 16.0,
    new_rank: int = 128,
    new_conv_rank: int | None = None,
    save_precision: str = "fp16",
    progress: bool = False,
    verbose: bool = False,
    rank_rule: str = "legacy",
    workers: int | None = None,
) -> tuple[LoraFile, dict]:
    """Resize every module as resize_lora.py does; return the kohya-format LoRA and a report.

    Report: ``modules`` {stem: old_rank, new_rank, new_alpha, sum_retained, fro_retained,
    max_ratio}, ``mean_sum_retained``, ``mean_fro_retained``, ``mean_retained`` (their mean),
    ``old_dim``, ``converted`` (stems converted from Tucker/LoHa/LoKr). ``verbose`` prints the
    per-module lines and the averages. Modules are resized on ``workers`` threads (default:
    ``torch.get_num_threads()``, so ``torch.set_num_threads`` governs it); the result does not
    depend on the number.
    """
    opts = _options(method, param, new_rank, new_conv_rank, save_precision, rank_rule)
    out: dict[str, torch.Tensor] = {}
    entries = _resize_all(lora, opts, out.__setitem__, workers=workers, progress=progress, verbose=verbose)
    result = LoraFile(
        tensors=out,
        metadata=_result_metadata(lora, opts, _last_alpha(entries)),
        format="lora",
        arch=lora.arch,
        modules=build_modules_unchecked(out),
        path=lora.path,
    )
    return result, _report(lora, opts, entries)


def _header_bound(lora: LoraFile, opts: dict, output_name: str | None) -> int:
    """Header bytes enough for any output: every module at its rank cap (most digits in shapes
    and offsets), and room for any float as ``ss_network_alpha``."""
    dtype = PRECISIONS[opts["save_precision"]]
    specs = []
    for stem in _stems(lora):
        shape = target_shape(lora.modules[stem], lora.arch)
        k = opts["conv_rank"] if len(shape) == 4 else opts["new_rank"]
        up = (shape[0], k, 1, 1) if len(shape) == 4 else (shape[0], k)
        specs += [(f"{stem}.alpha", dtype, ()), (f"{stem}.lora_down.weight", dtype, (k, *shape[1:])),
                  (f"{stem}.lora_up.weight", dtype, up)]  # fmt: skip
    return header_room(specs, _result_metadata(lora, opts, "x" * 32, output_name))


def compress_file(src: str | Path, dst: str | Path, *, progress: bool = False, verbose: bool = False,
                  workers: int | None = None, output_name: str | None = None, **options) -> dict:  # fmt: skip
    """Read ``src``, resize it like :func:`compress_lora` with ``options``, write ``dst`` atomically.

    ``ss_output_name`` and ``modelspec.title`` are kept as ``src`` has them, or both set to
    ``output_name`` when it is given.

    The output is written module by module while later ones compute (and hashed meanwhile), so
    it never sits in memory whole. Returns the report plus ``src``, ``dst``, ``size_in`` and
    ``size_out`` (bytes). Nothing is written on error.
    """
    lora = load_lora(src)
    try:
        opts = _options(**{"method": "sv_ratio", "param": 16.0, "new_rank": 128, "new_conv_rank": None,
                           "save_precision": "fp16", "rank_rule": "legacy", **options})  # fmt: skip
        with_output_name({}, output_name)
    except ValueError as exc:  # a bad option value; a TypeError (unknown option) is a bug and propagates
        raise OptionError(str(exc)) from None
    with stream_lora(dst, _header_bound(lora, opts, output_name)) as out:
        entries = _resize_all(lora, opts, out.add, workers=workers, progress=progress, verbose=verbose)
        out.finish(_result_metadata(lora, opts, _last_alpha(entries), output_name))
    report = _report(lora, opts, entries)
    report.update(src=str(src), dst=str(dst), size_in=Path(src).stat().st_size, size_out=Path(dst).stat().st_size)
    return report


def report_json(report: dict) -> str:
    """The report as JSON text (for logs and ``--json`` output)."""
    return json.dumps(report, indent=2, default=str)
