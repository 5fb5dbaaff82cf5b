"""SDXL conditioning (both text encoders, pooled prompt, size/crop ids) and the loss options.

The loss formulas are checked against sd-scripts' formulas written out here and against
diffusers' own implementations where it has one (``get_velocity``, ``rescale_zero_terminal_snr``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from charbuild.train.builtin.loss import (  # noqa: E402
    apply_noise_offset,
    apply_zero_terminal_snr,
    min_snr_weights,
    snr_table,
    training_target,
    v_pred_like_noise_pred_weights,
    velocity,
    zero_terminal_snr_betas,
)
from charbuild.train.builtin.sdxl import (  # noqa: E402
    encode_sdxl_prompts,
    sdxl_added_cond_kwargs,
    sdxl_time_ids,
    size_embedding,
    tokenize_sdxl,
)
from charbuild.train.builtin.tiny import SD15_SCHEDULER_CONFIG, ensure_tiny_sdxl_model  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    folder = ensure_tiny_sdxl_model(tmp_path_factory.mktemp("sdxl"), 0)
    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)


@pytest.fixture
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD15_SCHEDULER_CONFIG)


# ------------------------------------------------------------------------ conditioning


def test_tokenize_pads_each_tokenizer_its_way(pipe):
    ids1, ids2 = tokenize_sdxl(["krnk, 1girl", "a"], pipe.tokenizer, pipe.tokenizer_2)
    assert ids1.shape == ids2.shape == (2, 77)
    eos = pipe.tokenizer.eos_token_id
    assert ids1[1, 0] == pipe.tokenizer.bos_token_id and ids1[1, 2] == eos and (ids1[1, 3:] == eos).all()
    assert ids2[1, 2] == eos and (ids2[1, 3:] == 0).all()  # bigG pads with "!" (id 0)
    long_ids, _ = tokenize_sdxl(["x " * 200], pipe.tokenizer, pipe.tokenizer_2)
    assert long_ids.shape == (1, 77) and long_ids[0, -1] == eos


def test_encode_concatenates_penultimate_states_and_pools_at_eos(pipe):
    te1, te2 = pipe.text_encoder, pipe.text_encoder_2
    ids1, ids2 = tokenize_sdxl(["krnk, 1girl", "blue eyes"], pipe.tokenizer, pipe.tokenizer_2)
    with torch.no_grad():
        embeds = encode_sdxl_prompts(ids1, ids2, te1, te2, pipe.tokenizer_2.eos_token_id)
        out1 = te1(ids1, output_hidden_states=True)
        out2 = te2(ids2, output_hidden_states=True)
    w1, w2 = te1.config.hidden_size, te2.config.hidden_size
    assert embeds.hidden_states.shape == (2, 77, w1 + w2)
    assert torch.equal(embeds.hidden_states[..., :w1], out1.hidden_states[te1.config.num_hidden_layers - 1])
    assert torch.equal(embeds.hidden_states[..., w1:], out2.hidden_states[-2])
    eos_at = [int((row == pipe.tokenizer_2.eos_token_id).nonzero()[0]) for row in ids2]
    expected = te2.text_projection(out2.last_hidden_state[torch.arange(2), eos_at])
    assert torch.allclose(embeds.pooled, expected)
    # without an added token, CLIP's own pooling (highest id = eos) gives the same
    assert torch.allclose(embeds.pooled, out2.text_embeds, atol=1e-6)


def test_time_ids_and_the_unet_call(pipe):
    ids = sdxl_time_ids([(768, 512), (1024, 1024)], [(0, 0), (16, 32)], [(512, 384), (1024, 1024)])
    assert ids.tolist() == [[768, 512, 0, 0, 512, 384], [1024, 1024, 16, 32, 1024, 1024]]
    with pytest.raises(ValueError, match="one original size"):
        sdxl_time_ids([(1, 1)], [], [(1, 1)])
    ids1, ids2 = tokenize_sdxl(["a", "b"], pipe.tokenizer, pipe.tokenizer_2)
    with torch.no_grad():
        embeds = encode_sdxl_prompts(ids1, ids2, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer_2.eos_token_id)
        sample = torch.randn(2, 4, 8, 8)
        out = pipe.unet(sample, torch.tensor([10, 500]), embeds.hidden_states, added_cond_kwargs=sdxl_added_cond_kwargs(embeds, ids)).sample
        other = pipe.unet(sample, torch.tensor([10, 500]), embeds.hidden_states, added_cond_kwargs=sdxl_added_cond_kwargs(embeds, ids * 0 + 256)).sample
    assert out.shape == sample.shape
    assert not torch.allclose(out, other)  # the size conditioning reaches the UNet


def test_size_embedding_equals_the_unets(pipe):
    ids = sdxl_time_ids([(768, 512)], [(8, 0)], [(512, 384)])
    dim = pipe.unet.config.addition_time_embed_dim
    ours = size_embedding(ids, dim)
    theirs = pipe.unet.add_time_proj(ids.flatten()).reshape(1, -1)
    assert torch.allclose(ours, theirs, atol=1e-6)


# ------------------------------------------------------------------------ loss options


def test_zero_terminal_snr_matches_the_paper_and_diffusers(scheduler):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    old_bar = scheduler.alphas_cumprod.clone()
    betas = zero_terminal_snr_betas(scheduler.betas)
    bar = torch.cumprod(1 - betas, 0)
    assert float(bar[-1]) == 0.0
    assert torch.isclose(bar[0], old_bar[0])
    # √ᾱ is an affine map of the old √ᾱ (shift to 0 at T, keep t = 0)
    s_old, s_new = old_bar.sqrt(), bar.sqrt()
    expected = (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1])
    assert torch.allclose(s_new, expected, atol=1e-6)
    assert torch.allclose(betas, rescale_zero_terminal_snr(scheduler.betas.clone()), atol=1e-6)
    apply_zero_terminal_snr(scheduler)
    assert torch.allclose(scheduler.alphas_cumprod, bar) and float(scheduler.alphas_cumprod[-1]) == 0.0
    assert float(snr_table(scheduler.alphas_cumprod)[-1]) == 0.0


def test_min_snr_weights_epsilon_and_v(scheduler):
    snr = snr_table(scheduler.alphas_cumprod)
    a = scheduler.alphas_cumprod
    assert torch.allclose(snr, a / (1 - a), rtol=1e-5)
    t = torch.tensor([0, 10, 300, 999])
    gamma = 5.0
    eps = min_snr_weights(t, snr, gamma, v_prediction=False)
    v = min_snr_weights(t, snr, gamma, v_prediction=True)
    for i, step in enumerate(t.tolist()):
        s = float(snr[step])
        assert eps[i].item() == pytest.approx(min(s, gamma) / s, rel=1e-6)
        assert v[i].item() == pytest.approx(min(s, gamma) / (s + 1), rel=1e-6)
    assert eps[0] < 1 and eps[-1] == pytest.approx(1.0)  # low noise weighted down, high noise ×1
    like = v_pred_like_noise_pred_weights(t, snr)
    assert like[0].item() == pytest.approx(min(float(snr[0]), 1000) / (min(float(snr[0]), 1000) + 1))


def test_v_prediction_target_equals_diffusers_velocity(scheduler):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 400, 999])
    v = training_target("v_prediction", latents, noise, t, scheduler.alphas_cumprod)
    assert torch.allclose(v, scheduler.get_velocity(latents, noise, t), atol=1e-6)
    assert torch.allclose(v, velocity(latents, noise, t, scheduler.alphas_cumprod))
    assert training_target("epsilon", latents, noise, t, scheduler.alphas_cumprod) is noise
    with pytest.raises(ValueError, match="prediction type"):
        training_target("sample", latents, noise, t, scheduler.alphas_cumprod)
    # with zero terminal SNR the last step's target is -x0 exactly
    apply_zero_terminal_snr(scheduler)
    v_last = training_target("v_prediction", latents, noise, torch.tensor([999] * 3), scheduler.alphas_cumprod)
    assert torch.allclose(v_last, -latents)


def test_noise_offset_is_one_constant_per_image_channel():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert apply_noise_offset(latents, noise, None) is noise and apply_noise_offset(latents, noise, 0.0) is noise
    out = apply_noise_offset(latents, noise, 0.1, generator=torch.Generator().manual_seed(1))
    shift = torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out - noise, (0.1 * shift).expand_as(noise), atol=1e-7)
    adaptive = apply_noise_offset(latents, noise, 0.1, adaptive_noise_scale=0.5, generator=torch.Generator().manual_seed(1))
    offset = torch.clamp(0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    assert torch.allclose(adaptive - noise, (offset * shift).expand_as(noise), atol=1e-6)
