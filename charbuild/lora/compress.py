"""Rank reduction of LoRA files, choosing ranks exactly as sd-scripts' ``networks/resize_lora.py``.

Per module, with ``M = up @ down`` (float32, conv flattened, alpha scale excluded) and its
singular values S (descending, length ``min(out, in·kh·kw)``):

* ``sv_ratio p``: n = #(S > S[0]/p); ``sv_fro p``: n = searchsorted(cumsum(S²)/ΣS², p²) + 1;
  ``sv_cumulative p``: n = searchsorted(cumsum(S)/ΣS, p) + 1; n clamped to [1, len(S) − 1] and
  **the new rank is n + 1** (``rank_rule="legacy"``, the default: what resize_lora.py does,
  checked against sd-scripts main of 2026-02 in benchmarks/SD_SCRIPTS.md, and what real files
  carry, lora-formats.md §4). ``rank_rule="current"`` is an alternative without the off-by-one
  (rank = n clamped to [1, len(S)]), for users who want exactly the threshold count.
  ``method=None`` (CLI ``rank``): rank = ``new_rank``.
* then capped at ``new_rank`` (``new_conv_rank`` for 1x1 and 3x3 conv modules) **and at the
  module's own rank** (a LoRA/LoCon module; LoHa/LoKr deltas have no such rank); a module with
  S[0] ≤ 1e-6 gets rank 1. The own-rank cap is a deliberate deviation from resize_lora.py,
  whose ``+ 1`` gives a rank-r module rank r + 1 (a zero direction padded in) whenever all r
  singular values pass the threshold: a "compressed" dim-8 LoRA came out larger than its input.
  The kept directions and the delta are the same; only the zero padding is gone.
* ``new_up = U[:, :k]·diag(S[:k])``, ``new_down = Vh[:k]``, ``new_alpha = alpha / r · k``
  (computed in float32 as sd-scripts does, stored in the save dtype like every tensor).

M has rank ≤ r, so instead of resize_lora.py's SVD of the full (out × in·kh·kw) matrix we use
the factorisations ``up = Qu Ru`` and ``downᵀ = Qd Rd`` and the SVD of the r × r matrix
``Ru Rdᵀ``: the same S, U = Qu·U', Vh = Vh'·Qdᵀ, at a fraction of the cost. Ru and Rd come
from the Gram matrices (matrix products, far faster than Householder QR on a CPU), computed in
float32 with an estimate of the resulting singular-value error; a factor whose share of the
estimate is large (an ill-conditioned one, as a trained ``up`` usually is) gets its Gram in
float64; a module whose rank choice still lies within the error of flipping is redone in float64;
modules whose kept singular values are numerically zero take a thin-QR route instead (see
:func:`resize_factors`). Singular values beyond r are exactly 0 and enter the rank rules as such.

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

MIN_SV = 1e-6
METHODS = ("sv_ratio", "sv_fro", "sv_cumulative", None)
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "fp32": torch.float32}
RANK_RULES = ("legacy", "current")


def choose_rank(S: torch.Tensor, method: str | None, param: float, max_rank: int, rank_rule: str = "legacy") -> int:
    """The new rank for descending singular values ``S`` (full length min(out, in)), as resize_lora.py."""
    n_sv = len(S)
    if method == "sv_ratio":
        count = int(torch.sum(S > S[0] / param).item())
        idx = count if rank_rule == "legacy" else count - 1
    elif method in ("sv_cumulative", "sv_fro"):
        if method == "sv_cumulative":
            cum = torch.cumsum(S, dim=0) / float(torch.sum(S))
            target = param
        else:
            sq = S.pow(2)
            cum = torch.cumsum(sq, dim=0) / float(torch.sum(sq))
            target = param**2
        idx = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
        if rank_rule == "legacy":
            idx += 1
    elif method is None:
        idx = None
    else:
        raise ValueError(f"unknown method {method!r}; valid: sv_ratio, sv_fro, sv_cumulative, or None (fixed rank)")
    if idx is None:
        new_rank = max_rank
    elif rank_rule == "legacy":
        new_rank = max(1, min(idx, n_sv - 1)) + 1
    else:
        new_rank = max(0, min(idx, n_sv - 1)) + 1
    if float(S[0]) <= MIN_SV:
        return 1
    return min(new_rank, max_rank)


def _stats(S: torch.Tensor, k: int) -> dict[str, float]:
    s_sum = float(torch.sum(torch.abs(S)))
    sq = S.pow(2)
    fro = math.sqrt(float(torch.sum(sq)))
    last = float(S[k - 1]) if k - 1 < len(S) else 0.0
    return {
        "sum_retained": float(torch.sum(torch.abs(S[:k]))) / s_sum if s_sum else float("nan"),
        "fro_retained": math.sqrt(float(torch.sum(sq[:k]))) / fro if fro else float("nan"),
        "max_ratio": float(S[0]) / last if last else float("inf"),
    }


def _padded(S: torch.Tensor, length: int) -> torch.Tensor:
    if len(S) >= length:
        return S[:length]
    return torch.cat([S, S.new_zeros(length - len(S))])


def resize_factors(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float | torch.Tensor,
    max_rank: int,
    method: str | None,
    param: float,
    rank_rule: str = "legacy",
):
    """Resize one 2-D factor pair; returns ``(new_up, new_down, new_alpha, new_rank, stats)``.

    The r × r core: with ``Gu = upᵀup = Ruᵀ Ru`` (Cholesky; ``Ru = Λu^½ Vuᵀ`` from eigh if Gu is singular), so ``up = Qu Ru``
    with orthonormal Qu; likewise ``Rd`` from ``Gd = down downᵀ``, the singular values of
    ``M = up @ down`` are those of ``K = Ru Rdᵀ = Uk S Vkh``; the kept factors follow as
    ``Vh_k = S_k⁻¹ Uk_kᵀ Ru down`` and ``U_k S_k = up Ru⁻¹ Uk_k S_k`` (a triangular solve on the
    fast path, where Ru is checked to be well conditioned; ``up Gd Ruᵀ Uk_k S_k⁻¹`` otherwise).

    Fast path (:func:`_resize_fast`): float32 Grams (the two big r × r products), everything
    r × r in float64, with an a-posteriori bound on the singular values' relative error (a
    factor that makes the bound large gets a float64 Gram first); the module is recomputed in
    float64 with an r × r SVD (:func:`_resize_precise`) when the bound is still not small, when
    the rank choice is within the bound of flipping, or when a kept singular value is tiny
    (S_k < 1e-6·S_0, or S_0 ≤ 1e-6; then the thin-QR route is used).
    """
    fast = _resize_fast(up, down, scale, max_rank, method, param, rank_rule)
    if fast is not None:
        return fast
    return _resize_precise(up, down, scale, max_rank, method, param, rank_rule)


# Error model of the float32 Grams (products of fp16 values are exact in float32, the sums are
# not): with G scaled to unit diagonal, ‖ΔG‖ ≲ u·√n (probabilistic rounding bound, Higham &
# Mary 2019), and the singular values of M = up @ down move relatively by about ‖ΔG‖/λ_min(G)
# per factor. Measured on the benchmark file, the tests' fixtures and near-collinear factors,
# the true relative error was ≤ 0.18x this estimate (typically 0.01x).
_U32 = 2.0**-24
_U64 = 2.0**-53
_FAST_MAX_ERR = 2e-4  # larger estimates: float64 Grams
_MARGIN = 2.0  # a rank decision must hold for errors up to _MARGIN x the estimate


def _chol_cond(grams: torch.Tensor):
    """For a (2, r, r) pair of Grams: (upper Cholesky factors R, estimates of 1/λ_min of each
    Gram scaled to unit diagonal), or None if either is not numerically positive definite."""
    d = grams.diagonal(dim1=-2, dim2=-1)  # (2, r)
    if not bool(torch.all(d > 0)):
        return None
    l, info = torch.linalg.cholesky_ex(grams)
    if bool(torch.any(info != 0)):
        return None
    ls = l / d.sqrt()[..., :, None]  # Cholesky factors of D^-½ g D^-½
    x = torch.ones(2, grams.shape[-1], 1, dtype=grams.dtype)  # power iteration on their inverses: within ~10% after 8 steps
    norms = torch.ones(2, 1, 1, dtype=grams.dtype)
    for _ in range(8):
        x = torch.cholesky_solve(x, ls)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        x = x / norms
    ku, kd = (1.25 * norms.flatten()).tolist()
    if not (math.isfinite(ku) and math.isfinite(kd) and ku > 0 and kd > 0):
        return None
    return l.mT, ku, kd


def _resize_fast(up, down, scale, max_rank, method, param, rank_rule):
    """The float32-Gram route; None where its accuracy bound does not settle the result.

    A side whose float32 Gram is too ill-conditioned for the bound (or numerically singular)
    gets its Gram in float64 instead and goes on. That is how a trained LoRA's ``up`` usually
    looks (it starts at zero; κ 1e3-1e6 against ~3 for ``down``), and for ``up`` (out × r) it
    costs little next to the float32 Gram of a wide ``down``.
    """
    m, r = up.shape
    n = down.shape[1]
    grams = torch.stack([up.T @ up, torch.mm(down, down.T)]).double()
    units = [_U32, _U32]
    chol = _chol_cond(grams)
    terms = None if chol is None else (_U32 * math.sqrt(m) * chol[1], _U32 * math.sqrt(n) * chol[2])
    if terms is None or sum(terms) > _FAST_MAX_ERR:
        redo = (True, True) if terms is None else tuple(t > _FAST_MAX_ERR / 4 for t in terms)
        if not any(redo):
            return None
        for side, factor in enumerate((up, down)):
            if redo[side]:
                f64 = factor.double()
                grams[side] = f64.T @ f64 if side == 0 else f64 @ f64.T
                units[side] = _U64
        chol = _chol_cond(grams)
        if chol is None:
            return None
    roots, ku, kd = chol
    ru, rd = roots[0], roots[1]
    err = units[0] * math.sqrt(m) * ku + units[1] * math.sqrt(n) * kd
    if err > _FAST_MAX_ERR:
        return None
    kmat = ru @ rd.T
    lam, vec = torch.linalg.eigh(kmat @ kmat.T)  # ascending; S² and the left singular vectors of K
    s64 = lam.flip(0).clamp_min(0).sqrt()
    s = s64.float()
    full = _padded(s, min(m, n))
    k = choose_rank(full, method, param, max_rank, rank_rule)
    kk = min(k, r)
    s0, s_last = s64[[0, kk - 1]].tolist()
    tol = _MARGIN * err + 1e-12  # (+ eigh's own error, float64)
    if s0 <= MIN_SV * (1 + tol) or s_last < 1e-6 * s0 * (1 + tol):
        return None
    if not _rank_is_settled(s64, method, param, tol):
        return None
    uk = vec.flip(1)[:, :kk]
    down_coef = (uk.T @ ru) / s64[:kk, None]  # (kk, r): Vh_k = S_k⁻¹ Uk_kᵀ Ru down
    if units[0] == _U32:  # Ru well conditioned (the bound says so): U_k S_k = up Ru⁻¹ Uk_k S_k
        up_coef = torch.linalg.solve_triangular(ru, uk * s64[None, :kk], upper=True)
    else:  # without inverting a possibly ill-conditioned Ru: U_k S_k = up Gd Ruᵀ Uk_k S_k⁻¹
        up_coef = (grams[1] @ ru.T @ uk) / s64[None, :kk]
    new_down = torch.mm(down_coef.float(), down)
    new_up = torch.mm(up, up_coef.float())
    return _finish(new_up, new_down, k, scale, full)


def _rank_is_settled(s64: torch.Tensor, method: str | None, param: float, tol: float) -> bool:
    """Whether the rank rule gives the same answer for every S within relative ``tol`` of ``s64``."""
    if method is None:
        return True
    s = s64[s64 > 0]
    if method == "sv_ratio":
        ratio = s / s[0] * param  # the rule compares these with 1
        return not bool(torch.any((ratio - 1).abs() <= 2 * tol * ratio))  # S_i and S_0 both off by ≤ tol
    q = 1 if method == "sv_cumulative" else 2
    target = param if q == 1 else param**2
    w = s.pow(q)
    cum = torch.cumsum(w, 0) / w.sum()
    # every S_i moving by ≤ tol relatively moves each cum_i by ≤ 2·q·tol
    return not bool(torch.any((cum - target).abs() <= 2 * q * tol))


def _resize_precise(up, down, scale, max_rank, method, param, rank_rule):
    """Float64 Grams and core (the reference route of the fast path)."""
    r = up.shape[1]
    up = up.float()
    down = down.float()
    up64, down64 = up.double(), down.double()
    gu, gd = up64.T @ up64, down64 @ down64.T
    ru, rd = _gram_root(gu), _gram_root(gd)
    uk, s64, _ = torch.linalg.svd(ru @ rd.T)
    s = s64.float()
    full = _padded(s, min(up.shape[0], down.shape[1]))
    k = choose_rank(full, method, param, max_rank, rank_rule)
    kk = min(k, r)
    if float(s64[0]) <= MIN_SV or float(s64[kk - 1]) < 1e-6 * float(s64[0]):
        return _resize_factors_qr(up, down, scale, k, full)
    inv = 1.0 / s64[:kk]
    down_coef = (uk[:, :kk].T @ ru) * inv[:, None]  # (kk, r)
    up_coef = (gd @ ru.T @ uk[:, :kk]) * inv[None, :]  # (r, kk)
    new_down = down_coef.float() @ down
    new_up = up @ up_coef.float()
    return _finish(new_up, new_down, k, scale, full)


def _gram_root(g: torch.Tensor) -> torch.Tensor:
    """R with ``Rᵀ R = g``: Cholesky (upper factor), or ``Λ^½ Vᵀ`` from eigh when g is singular."""
    l, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return l.T
    lam, v = torch.linalg.eigh(g)
    return lam.clamp_min(0).sqrt()[:, None] * v.T


def _resize_factors_qr(up, down, scale, k, full):
    """The thin-QR route (robust for rank-deficient factors)."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    uk, s, vkh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    kk = min(k, len(s))
    return _finish((qu @ uk[:, :kk]) * s[:kk], vkh[:kk] @ qd.T, k, scale, full)


def resize_full(delta: torch.Tensor, max_rank: int, method: str | None, param: float, rank_rule: str = "legacy"):
    """Resize a full 2-D delta (scale included) by its SVD; returns like :func:`resize_factors`."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = choose_rank(s, method, param, max_rank, rank_rule)
    kk = min(k, len(s))
    return _finish(u[:, :kk] * s[:kk], vh[:kk], k, 1.0, s)


def pad_to_rank(up: torch.Tensor, down: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D factors widened to rank ``k`` with zero directions (S = 0) where they are narrower."""
    if up.shape[1] < k:
        pad = k - up.shape[1]
        up = torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1)
        down = torch.cat([down, down.new_zeros(pad, down.shape[1])], dim=0)
    return up, down


def _finish(new_up, new_down, k, scale, S):
    new_up, new_down = pad_to_rank(new_up, new_down, k)  # rank above the matrix rank
    new_alpha = float(scale * k)
    return new_up, new_down, new_alpha, k, _stats(S, k)


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
