"""The SDXL pieces put together as the training loop will call them, on tiny-sdxl (CPU).

A few LoRA steps with both text encoders, size/crop conditioning, v-prediction with
zero-terminal-SNR, min-SNR-γ and noise offset: gradients reach every part, the loss falls on
a fixed batch, and the saved kohya SDXL file loads back into a fresh network.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from charbuild.lora.keysets import sdxl_modules  # noqa: E402
from charbuild.train.builtin.loss import (  # noqa: E402
    apply_noise_offset,
    apply_zero_terminal_snr,
    min_snr_weights,
    snr_table,
    training_target,
)
from charbuild.train.builtin.models import load_base_model  # noqa: E402
from charbuild.train.builtin.network import LoRANetwork, NetworkSpec  # noqa: E402
from charbuild.train.builtin.sdxl import encode_sdxl_prompts, sdxl_added_cond_kwargs, sdxl_time_ids, tokenize_sdxl  # noqa: E402


@pytest.fixture
def one_thread():
    # on a shared CPU, one thread is faster for models this small (as the trainer chooses)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sdxl_lora_steps_train_unet_and_both_encoders(tmp_path, one_thread):
    torch.manual_seed(0)
    base = load_base_model({"base": "tiny-sdxl"}, tmp_path, supported_archs=("sd15", "sdxl"))
    sched = base.noise_scheduler
    apply_zero_terminal_snr(sched)
    snr = snr_table(sched.alphas_cumprod)
    network = LoRANetwork(base.unet, (base.text_encoder, base.text_encoder_2), NetworkSpec("lora", 4, 4, 4, 4))
    network.apply_to()
    network.requires_grad_(True)
    optimizer = torch.optim.AdamW(network.param_groups(3e-3, 3e-3), weight_decay=0.0)

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 6, generator=g)
    noise = apply_noise_offset(latents, torch.randn(2, 4, 8, 6, generator=g), 0.05, generator=g)
    timesteps = torch.tensor([150, 700])
    noisy = sched.add_noise(latents, noise, timesteps)
    target = training_target("v_prediction", latents, noise, timesteps, sched.alphas_cumprod)
    weights = min_snr_weights(timesteps, snr, 5.0, v_prediction=True)
    ids1, ids2 = tokenize_sdxl(["krnk, 1girl, blue eyes", "krnk, smile"], base.tokenizer, base.tokenizer_2)
    time_ids = sdxl_time_ids([(128, 96), (128, 128)], [(0, 0), (8, 0)], [(128, 96), (128, 128)])

    losses = []
    for step in range(4):
        embeds = encode_sdxl_prompts(ids1, ids2, base.text_encoder, base.text_encoder_2, base.tokenizer_2.eos_token_id)
        pred = base.unet(noisy, timesteps, embeds.hidden_states, added_cond_kwargs=sdxl_added_cond_kwargs(embeds, time_ids)).sample
        per_sample = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_"):
                grads = [m.lora_up.weight.grad for m in list(network.unet_loras) + list(network.te_loras) if m.stem.startswith(prefix)]
                assert grads and any(gr is not None and gr.abs().sum() > 0 for gr in grads), prefix
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]

    state = network.kohya_state_dict(torch.float16)
    stems = {k.rsplit(".", 2)[0] if k.endswith((".lora_down.weight", ".lora_up.weight")) else k.rsplit(".", 1)[0] for k in state}
    assert stems <= {s for s, *_ in sdxl_modules(conv=True, te=True)}
    assert any(s.startswith("lora_te2_") for s in stems) and any(s.startswith("lora_unet_output_blocks_") for s in stems)
    fresh = LoRANetwork(base.unet, (base.text_encoder, base.text_encoder_2), NetworkSpec("lora", 4, 4, 4, 4))
    assert fresh.load_kohya_state_dict(state) == ([], [])
    again = fresh.kohya_state_dict(torch.float16)
    assert all(torch.equal(state[k], again[k]) for k in state)
