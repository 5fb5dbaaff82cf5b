"""The rank rules of sd-scripts' ``networks/resize_lora.py`` and the SVD of a LoRA module from its factors.

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
"""

from __future__ import annotations

import math

import torch

MIN_SV = 1e-6
METHODS = ("sv_ratio", "sv_fro", "sv_cumulative", None)
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
