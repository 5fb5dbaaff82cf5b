"""LoRA / LoCon / LoHa modules that hook into diffusers' UNet and transformers' CLIP.

Module selection and key names follow kohya-ss sd-scripts ``networks.lora``:

- UNet: every ``Linear`` and 1x1 ``Conv2d`` inside a ``Transformer2DModel`` (``proj_in``,
  ``proj_out``, ``attn{1,2}.to_{q,k,v}``, ``attn{1,2}.to_out.0``, ``ff.net.0.proj``,
  ``ff.net.2``) gets rank ``dim``/``alpha``. With ``conv_dim`` set (Lora3x3, Locon, Loha),
  ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D`` are searched too: their 3x3 convs
  (``conv1``, ``conv2``, ``downsamplers.0.conv``, ``upsamplers.0.conv``) get ``conv_dim``/
  ``conv_alpha`` and their ``Linear``/1x1 convs (``time_emb_proj``, ``conv_shortcut``) get
  ``dim``/``alpha``, exactly as kohya's ``create_modules`` decides.
- Text encoder: ``Linear`` children of ``CLIPAttention``/``CLIPMLP`` (``self_attn.{q,k,v,out}_proj``,
  ``mlp.fc{1,2}``).
- Stem = ``lora_unet`` / ``lora_te`` + ``.`` + module path, with ``.`` → ``_``; the text
  encoder's path always starts ``text_model.`` (transformers 5 dropped that level; we add it). diffusers and
  transformers use SD1.5's names, so the stems are the ones the WebUIs expect.
- SDXL (``arch="sdxl"``, detected from the UNet's ``addition_embed_type = "text_time"``): the
  same modules, but the UNet path is first converted to the original SGM path that
  ``sdxl_train_network.py`` writes (``input_blocks``/``middle_block``/``output_blocks``, see
  :mod:`.sdxl_names`), and the two text encoders are ``lora_te1`` (CLIP-L) and ``lora_te2``
  (OpenCLIP bigG), as sd-scripts' ``LORA_PREFIX_TEXT_ENCODER1/2``.

LoRA: ``down`` (r, in[, k, k]) kaiming-uniform(a=√5), ``up`` (out, r[, 1, 1]) zeros, output
``org(x) + up(down(x)) · alpha / r``. LoHa (LyCORIS ``algo=loha``): ΔW = (w1a·w1b) ⊙ (w2a·w2b) ·
alpha / r, initialised like LyCORIS (w1b, w2b ~ N(0, 1), w1a ~ N(0, 0.1), w2a = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

UNET_TARGETS = ("Transformer2DModel",)
UNET_TARGETS_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


class _Adapter(nn.Module):
    """Common part: hooks ``org_module.forward`` and adds a learned delta."""

    def __init__(self, stem: str, org_module: nn.Module, alpha: float, rank: int):
        super().__init__()
        self.stem = stem
        self.rank = int(rank)
        alpha = float(alpha) if alpha not in (None, 0) else float(rank)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.rank
        self.multiplier = 1.0
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self._org = [org_module]  # a list, so it is not registered as a submodule
        self.org_forward = None

    def apply_to(self) -> None:
        """Replace the wrapped module's forward with ours."""
        org = self._org[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Undo :meth:`apply_to`."""
        if self.org_forward is not None:
            self._org[0].forward = self.org_forward
            self.org_forward = None


class LoRAModule(_Adapter):
    """kohya LoRA (and LyCORIS LoCon without Tucker): same keys, same shapes."""

    def __init__(self, stem: str, org_module: nn.Module, rank: int, alpha: float):
        super().__init__(stem, org_module, alpha, rank)
        if self.is_conv:
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.lora_down = nn.Conv2d(
                in_dim, rank, org_module.kernel_size, org_module.stride, org_module.padding, bias=False
            )
            self.lora_up = nn.Conv2d(rank, out_dim, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * (self.multiplier * self.scale)


class LoHaModule(_Adapter):
    """LyCORIS LoHa: Hadamard product of two rank-r factorisations."""

    def __init__(self, stem: str, org_module: nn.Module, rank: int, alpha: float):
        super().__init__(stem, org_module, alpha, rank)
        if self.is_conv:
            out_dim = org_module.out_channels
            in_dim = org_module.in_channels * math.prod(org_module.kernel_size)
            self.shape = (org_module.out_channels, org_module.in_channels, *org_module.kernel_size)
        else:
            out_dim, in_dim = org_module.out_features, org_module.in_features
            self.shape = (out_dim, in_dim)
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim))
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the wrapped module's weight shape (scale included)."""
        w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (w * self.scale).reshape(self.shape)

    def forward(self, x):
        org = self._org[0]
        dw = self.delta_weight().to(x.dtype) * self.multiplier
        if self.is_conv:
            delta = F.conv2d(x, dw, None, org.stride, org.padding, org.dilation, org.groups)
        else:
            delta = F.linear(x, dw)
        return self.org_forward(x) + delta


@dataclass(frozen=True)
class NetworkSpec:
    """What to build: algorithm ("lora" | "loha"), ranks and alphas."""

    algo: str
    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float | None = None


def _find_targets(
    root: nn.Module,
    prefix: str,
    targets: tuple[str, ...],
    spec: NetworkSpec,
    conv_search: bool,
    rename: Callable[[str], str] | None = None,
):
    """Yield (stem, module, rank, alpha) for every module kohya would adapt.

    ``rename`` maps a module path of ``root`` to the path the stem is made of (SDXL's UNet).
    """
    seen = set()
    for name, module in root.named_modules():
        if module.__class__.__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            is_linear = isinstance(child, nn.Linear)
            is_conv = isinstance(child, nn.Conv2d)
            if not (is_linear or is_conv):
                continue
            is_1x1 = is_conv and tuple(child.kernel_size) == (1, 1)
            path = f"{name}.{child_name}" if child_name else name
            stem = f"{prefix}.{rename(path) if rename else path}".replace(".", "_")
            if is_linear or is_1x1:
                rank, alpha = spec.dim, spec.alpha
            elif conv_search and spec.conv_dim:
                rank, alpha = spec.conv_dim, spec.conv_alpha if spec.conv_alpha is not None else spec.conv_dim
            else:
                continue
            if not rank or stem in seen:
                continue
            seen.add(stem)
            yield stem, child, int(rank), alpha


def unet_arch(unet: nn.Module) -> str:
    """"sdxl" for a UNet with SDXL's size/crop + pooled-text conditioning, else "sd15"."""
    config = getattr(unet, "config", None)
    return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd15"


def _te_prefix(text_encoder: nn.Module, prefix: str) -> str:
    # transformers 5 flattened CLIPTextModel (no ``text_model`` level); kohya names keep it
    return prefix if hasattr(text_encoder, "text_model") else f"{prefix}.text_model"


class LoRANetwork(nn.Module):
    """All adapter modules of one training run, on a UNet and (optionally) its text encoder(s).

    ``text_encoder``: ``None`` (UNet only), one module (SD1.5), or for SDXL a pair
    ``(text_encoder_1, text_encoder_2)`` (either may be ``None``). ``arch``: "sd15" or "sdxl";
    ``None`` takes it from the UNet (:func:`unet_arch`).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | Sequence[nn.Module | None] | None,
        spec: NetworkSpec,
        arch: str | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.arch = arch or unet_arch(unet)
        if self.arch not in ("sd15", "sdxl"):
            raise ValueError(f"unknown arch {self.arch!r} (sd15 or sdxl)")
        cls = {"lora": LoRAModule, "loha": LoHaModule}[spec.algo]
        unet_targets = UNET_TARGETS + (UNET_TARGETS_CONV if spec.conv_dim else ())
        rename = None
        if self.arch == "sdxl":
            from .sdxl_names import sdxl_unet_module_name, up_block_attentions

            has_attn = up_block_attentions(unet)
            rename = lambda path: sdxl_unet_module_name(path, has_attn)  # noqa: E731
        self.unet_loras = nn.ModuleList(
            cls(stem, m, r, a) for stem, m, r, a in _find_targets(unet, "lora_unet", unet_targets, spec, True, rename)
        )
        if isinstance(text_encoder, nn.Module) or text_encoder is None:
            encoders = [text_encoder]
        else:
            encoders = list(text_encoder)
        if self.arch == "sdxl":
            if len(encoders) == 1 and encoders[0] is not None:
                raise ValueError("an SDXL network needs both text encoders: pass (text_encoder_1, text_encoder_2)")
            prefixes = ["lora_te1", "lora_te2"]
        else:
            if len(encoders) != 1:
                raise ValueError("an SD1.x network has one text encoder")
            prefixes = ["lora_te"]
        self.te_loras = nn.ModuleList()
        for te, prefix in zip(encoders, prefixes):
            if te is not None:
                found = _find_targets(te, _te_prefix(te, prefix), TE_TARGETS, spec, False)
                self.te_loras.extend(cls(stem, m, r, a) for stem, m, r, a in found)
        if not self.unet_loras:
            raise ValueError("no UNet module to adapt: is this a diffusers Stable Diffusion UNet?")

    def apply_to(self) -> None:
        """Hook every adapter into its module."""
        for m in list(self.unet_loras) + list(self.te_loras):
            m.apply_to()

    def param_groups(self, unet_lr, te_lr) -> list[dict]:
        """Optimizer parameter groups: UNet adapters at ``unet_lr``, text encoder at ``te_lr``.

        A learning rate of ``None`` leaves the key out (for optimizers that pick their own).
        """
        groups = []
        for mods, lr in ((self.unet_loras, unet_lr), (self.te_loras, te_lr)):
            params = [p for m in mods for p in m.parameters()]
            if params:
                g = {"params": params}
                if lr is not None:
                    g["lr"] = lr
                groups.append(g)
        return groups

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors under kohya/LyCORIS key names, in ``dtype``, contiguous and on the CPU."""
        out = {}
        for m in list(self.unet_loras) + list(self.te_loras):
            for key, t in m.state_dict().items():
                if key.endswith("alpha"):
                    t = t.reshape(())
                out[f"{m.stem}.{key}"] = t.detach().to("cpu", dtype).contiguous()
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load weights saved by :meth:`kohya_state_dict` (or kohya); return (missing, unexpected)."""
        own = {}
        for m in list(self.unet_loras) + list(self.te_loras):
            for key in m.state_dict():
                own[f"{m.stem}.{key}"] = (m, key)
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        for full, (m, key) in own.items():
            if full in sd:
                target = m.state_dict()[key]
                src = sd[full]
                if tuple(src.shape) != tuple(target.shape) and src.numel() == target.numel():
                    src = src.reshape(target.shape)
                if tuple(src.shape) != tuple(target.shape):
                    raise ValueError(f"{full}: shape {tuple(src.shape)} does not fit {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(src.to(target.dtype))
                if key == "alpha":
                    m.scale = float(src) / m.rank
        return missing, unexpected
