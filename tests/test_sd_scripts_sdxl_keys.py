"""Our SDXL LoRA module set against the one sd-scripts' own ``networks.lora`` creates (opt-in).

Marker ``sdscripts``; skipped unless ``CHARBUILD_SD_SCRIPTS`` (an sd-scripts checkout) and
``CHARBUILD_SD_PYTHON`` (a python with its dependencies) are set, as in test_sd_scripts_real.py:

    CHARBUILD_SD_SCRIPTS=/tmp/sd-scripts CHARBUILD_SD_PYTHON=/tmp/sdenv/bin/python \\
        python -m pytest -m sdscripts tests/test_sd_scripts_sdxl_keys.py -v

The worker builds sd-scripts' ``SdxlUNet2DConditionModel`` and SDXL's two text encoders on the
meta device (no memory), calls ``networks.lora.create_network`` with conv_dim, and prints every
module's kohya name and shapes; ours come from diffusers' UNet built from charbuild's shipped
SDXL configs, also on meta.

sd-scripts' python must have its pinned transformers (4.x): transformers 5 dropped
``CLIPTextModel``'s ``text_model`` level, and sd-scripts would then name the first encoder's
modules ``lora_te1_encoder_…`` instead of the ``lora_te1_text_model_encoder_…`` that real SDXL
LoRA files carry. (Run once here with transformers 5 and a stub for sd-scripts'
``library.utils``, which imports torchvision: all 1052 / 986 modules and shapes equal but for
exactly that te1 prefix.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent
SD_SCRIPTS = os.environ.get("CHARBUILD_SD_SCRIPTS")
SD_PYTHON = os.environ.get("CHARBUILD_SD_PYTHON")

pytestmark = [
    pytest.mark.sdscripts,
    pytest.mark.skipif(not (SD_SCRIPTS and SD_PYTHON), reason="set CHARBUILD_SD_SCRIPTS and CHARBUILD_SD_PYTHON"),
]

WORKER = r"""
import json, sys
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from library import sdxl_original_unet
from networks import lora

common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-05)
with torch.device("meta"):
    unet = sdxl_original_unet.SdxlUNet2DConditionModel()
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                      num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **common))
    net = lora.create_network(1.0, 4, 2, None, [te1, te2], unet, conv_dim=sys.argv[1] or None, conv_alpha=sys.argv[1] or None)
out = {}
for m in list(net.unet_loras) + list(net.text_encoder_loras):
    down, up = m.lora_down.weight, m.lora_up.weight
    kernel = 0 if down.dim() == 2 else int(down.shape[-1])
    out[m.lora_name] = [int(up.shape[0]), int(down.shape[1]), kernel]
print(json.dumps(out))
"""


def _sd_scripts_modules(conv: bool) -> dict[str, tuple[int, int, int]]:
    env = dict(os.environ, PYTHONPATH=SD_SCRIPTS)
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([SD_PYTHON, "-c", WORKER, "4" if conv else ""], cwd=SD_SCRIPTS, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: tuple(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _our_modules(conv: bool) -> dict[str, tuple[int, int, int]]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from charbuild.train.builtin.network import LoRANetwork, NetworkSpec

    configs = REPO / "charbuild" / "train" / "builtin" / "configs" / "sdxl"

    def cfg(sub):
        return json.loads((configs / sub / "config.json").read_text(encoding="utf-8"))

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        te1 = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
        net = LoRANetwork(unet, (te1, te2), NetworkSpec("lora", 4, 2, 4 if conv else None, 2 if conv else None))
    out = {}
    for m in list(net.unet_loras) + list(net.te_loras):
        org = m._org[0]
        if isinstance(org, torch.nn.Linear):
            out[m.stem] = (org.out_features, org.in_features, 0)
        else:
            out[m.stem] = (org.out_channels, org.in_channels, org.kernel_size[0])
    return out


@pytest.mark.parametrize("conv", [True, False])
def test_sdxl_module_set_equals_sd_scripts(conv):
    theirs, ours = _sd_scripts_modules(conv), _our_modules(conv)
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    assert {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]} == {}


if __name__ == "__main__":  # pragma: no cover - a quick manual run
    sys.exit(pytest.main([__file__, "-v", "-m", "sdscripts"]))
