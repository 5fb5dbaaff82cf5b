"""Synthetic LoRA builders with the real SD1.5/SDXL key sets and layer shapes (small ranks).

``make_lora(arch, kind, modules=…)`` returns ``(tensors, metadata)`` in the layout the real
tools write; ``reference_delta`` recomputes a module's ΔW independently of charbuild.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from charbuild.lora.keysets import modules_for

KINDS = ("lora", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_factored_w1")


def _split(n: int) -> tuple[int, int]:
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def module_tensors(
    stem: str, out: int, inp: int, k: int, rank: int, kind: str, gen: torch.Generator, alpha: float | None
) -> dict[str, torch.Tensor]:
    """Factors of one module; k = 0 Linear, 1 or 3 conv kernel."""
    kk = max(k, 1)

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * s

    t: dict[str, torch.Tensor] = {}
    if kind == "lora" or (kind == "locon_tucker" and k != 3):
        if k == 0:
            t["lora_down.weight"] = rnd(rank, inp, s=0.1)
            t["lora_up.weight"] = rnd(out, rank, s=0.1)
        else:
            t["lora_down.weight"] = rnd(rank, inp, kk, kk, s=0.1)
            t["lora_up.weight"] = rnd(out, rank, 1, 1, s=0.1)
    elif kind == "locon_tucker":
        t["lora_down.weight"] = rnd(rank, inp, 1, 1, s=0.1)
        t["lora_mid.weight"] = rnd(rank, rank, kk, kk, s=0.3)
        t["lora_up.weight"] = rnd(out, rank, 1, 1, s=0.1)
    elif kind == "loha" or (kind == "loha_tucker" and k != 3):
        for i in ("1", "2"):
            t[f"hada_w{i}_a"] = rnd(out, rank, s=0.1)
            t[f"hada_w{i}_b"] = rnd(rank, inp * kk * kk, s=0.1)
    elif kind == "loha_tucker":
        for i in ("1", "2"):
            t[f"hada_t{i}"] = rnd(rank, rank, kk, kk, s=0.3)
            t[f"hada_w{i}_a"] = rnd(rank, out, s=0.1)
            t[f"hada_w{i}_b"] = rnd(rank, inp, s=0.1)
    elif kind in ("lokr", "lokr_factored_w1"):
        a, b = _split(out)
        c, d = _split(inp)
        if kind == "lokr":
            t["lokr_w1"] = rnd(a, c, s=0.3)
        else:
            t["lokr_w1_a"] = rnd(a, rank, s=0.3)
            t["lokr_w1_b"] = rnd(rank, c, s=0.3)
        t["lokr_w2_a"] = rnd(b, rank, s=0.1)
        t["lokr_w2_b"] = rnd(rank, d * kk * kk, s=0.1)
    else:
        raise ValueError(kind)
    if alpha is not None:
        t["alpha"] = torch.tensor(float(alpha))
    return {f"{stem}.{suffix}": v for suffix, v in t.items()}


def representative_modules(
    arch: str = "sd15", *, extra: bool = True, max_numel: int = 1_700_000
) -> list[tuple[str, int, int, int]]:
    """A small subset of the real key set: per block one module of each kernel kind (Linear,
    1x1, 3x3, cross-attention, shortcut) whose layer has at most ``max_numel`` weights."""
    from charbuild.lora.blocks import block_of

    seen: set[tuple[str | None, int, str]] = set()
    picked = []
    for stem, o, i, k in modules_for(arch, conv=True, te=True, extra=extra):
        if o * i * max(k, 1) ** 2 > max_numel:
            continue
        block = block_of(stem, arch)
        sort = "cross" if "attn2_to_k" in stem else "shortcut" if "shortcut" in stem or "skip" in stem else ""
        key = (block, k, sort)
        if key in seen:
            continue
        seen.add(key)
        picked.append((stem, o, i, k))
    return picked


def make_lora(
    arch: str = "sd15",
    kind: str = "lora",
    *,
    modules: list[tuple[str, int, int, int]] | None = None,
    rank: int = 4,
    alpha: float | None = 2.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A synthetic LoRA: ``(tensors, metadata)`` over ``modules`` (default: representative subset)."""
    gen = torch.Generator().manual_seed(seed)
    mods = representative_modules(arch) if modules is None else modules
    tensors: dict[str, torch.Tensor] = {}
    for stem, o, i, k in mods:
        tensors.update(module_tensors(stem, o, i, k, rank, kind, gen, alpha))
    tensors = {key: v.to(dtype) for key, v in tensors.items()}
    meta = {
        "ss_network_module": "networks.lora" if kind == "lora" else "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1" if arch == "sd15" else "sdxl_base_v1-0",
        "ss_training_comment": "synthetic",
        "ss_output_name": "synthetic",
        "modelspec.title": "synthetic",
    }
    if kind != "lora":
        algo = {"locon_tucker": "locon", "loha_tucker": "loha", "lokr_factored_w1": "lokr"}.get(kind, kind)
        meta["ss_network_args"] = f'{{"algo": "{algo}"}}'
    meta.update(metadata or {})
    return tensors, meta


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write with plain safetensors (independent of charbuild's writer)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def reference_delta(tensors: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """ΔW of ``stem`` (float64, flattened to (out, -1)) straight from the formulas in lora-formats.md."""
    p = {k[len(stem) + 1 :]: v.double() for k, v in tensors.items() if k.split(".", 1)[0] == stem}
    alpha = p.get("alpha")
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in p:
            mid = p["lora_mid.weight"]
            w = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
        else:
            w = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
        scale = 1.0 if alpha is None else float(alpha) / r
        return w.reshape(w.shape[0], -1) * scale
    if "hada_w1_a" in p:
        r = p["hada_w1_b"].shape[0]

        def part(i: str) -> torch.Tensor:
            if f"hada_t{i}" in p:
                t, a, b = p[f"hada_t{i}"], p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
                w = torch.einsum("ijhw,ip,jq->pqhw", t, a, b)
                return w.reshape(w.shape[0], -1)
            return p[f"hada_w{i}_a"] @ p[f"hada_w{i}_b"]

        scale = 1.0 if alpha is None else float(alpha) / r
        return part("1") * part("2") * scale
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    r = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0]
    scale = 1.0 if alpha is None else float(alpha) / r
    return torch.kron(w1, w2) * scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, float64)."""
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def reference_rank(S, method, param, cap):
    """resize_lora.py's rank rule as lora-formats.md §4 states it (legacy +1), written independently."""
    n_all = len(S)
    if method == "sv_ratio":
        n = int((S > S[0] / param).sum())
    elif method == "sv_fro":
        c = torch.cumsum(S**2, 0) / (S**2).sum()
        n = int(torch.searchsorted(c, torch.tensor(param**2))) + 1
    elif method == "sv_cumulative":
        c = torch.cumsum(S, 0) / S.sum()
        n = int(torch.searchsorted(c, torch.tensor(float(param)))) + 1
    else:
        return 1 if S[0] <= 1e-6 else cap
    rank = min(max(n, 1), n_all - 1) + 1
    if S[0] <= 1e-6:
        return 1
    return min(rank, cap)
