"""The model calls of the builtin trainer, shared by a training step, validation and samples.

A training step (:func:`.trainer.batch_loss`), the validation loss (:mod:`.validation`) and the
sample renderer (:mod:`.samples`) encode captions and call the UNet the same way; the functions
here are that one way. They read the trainer's ``Setup`` (its ``clip_skip``) and ``Prepared``
(the loaded modules, device, weight dtype, caption cache) by attribute, and import nothing of
:mod:`.trainer`, so that validation and samples need not import the trainer that runs them.
"""

from __future__ import annotations

from charbuild.errors import TrainingError


def encode_text(tokenizer, text_encoder, captions: list[str], clip_skip: int | None, device):
    """SD1.x conditioning as sd-scripts: ``hidden_states[-clip_skip]`` + final layer norm."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    if not clip_skip or clip_skip <= 1:
        return text_encoder(ids, return_dict=True).last_hidden_state
    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    n = len(out.hidden_states) - 1
    if clip_skip > n:
        raise TrainingError(f"clip_skip {clip_skip} is more than the text encoder's {n} layers")
    h = out.hidden_states[-clip_skip]
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(h)


def conditioning(setup, prep, batch: list[tuple[int, bool]], captions: list[str]):
    """(encoder hidden states, SDXL's ``added_cond_kwargs`` or None) of a batch of (item index,
    flipped): :func:`text_conditioning` of its captions, and for SDXL each picture's size/crop ids
    (:func:`.data.sdxl_size_conditioning`)."""
    text = text_conditioning(setup, prep, captions)
    if prep.arch != "sdxl":
        return unet_conditioning(prep, text, None)
    from .data import sdxl_size_conditioning
    from .sdxl import sdxl_time_ids

    sizes = [sdxl_size_conditioning(prep.dataset.items[i], flipped) for i, flipped in batch]
    return unet_conditioning(prep, text, sdxl_time_ids(*zip(*sizes), device=prep.device))


def text_conditioning(setup, prep, captions: list[str]):
    """The text encoders' output of ``captions``: SD1.x hidden states, SDXL an :class:`.sdxl.SDXLPromptEmbeds`.

    The encoders run with gradients when their adapters train; else each caption is encoded
    once and kept (:func:`frozen_conditioning`).
    """
    if prep.arch != "sdxl":
        if prep.train_text_encoder:
            return encode_text(prep.tokenizer, prep.text_encoder, captions, setup.clip_skip, prep.device)
        return cached_states(prep, captions, setup.clip_skip)
    if not prep.train_text_encoder:
        return frozen_conditioning(setup, prep, captions)
    from .sdxl import encode_sdxl_prompts, tokenize_sdxl

    ids1, ids2 = tokenize_sdxl(captions, prep.tokenizer, prep.tokenizer_2)
    return encode_sdxl_prompts(ids1, ids2, prep.text_encoder, prep.text_encoder_2, prep.tokenizer_2.eos_token_id)


def unet_conditioning(prep, text, time_ids):
    """(hidden states, ``added_cond_kwargs`` or None) for the UNet from :func:`text_conditioning`'s
    ``text`` and, for SDXL, the size/crop ``time_ids`` (:func:`.sdxl.sdxl_time_ids`)."""
    if prep.arch != "sdxl":
        return text, None
    import torch

    from .sdxl import sdxl_added_cond_kwargs

    added = sdxl_added_cond_kwargs(text, time_ids)
    # the pooled prompt in the weight dtype; the size ids in fp32 (sdxl_added_cond_kwargs)
    added = {k: v.to(prep.device, prep.weight_dtype if k == "text_embeds" else torch.float32) for k, v in added.items()}
    return text.hidden_states.to(prep.device), added


def predict_noise(prep, noisy, t, cond, added):
    """The UNet's output (noise or velocity, as the model predicts) for ``noisy`` latents at
    timesteps ``t`` with :func:`unet_conditioning`'s ``cond`` and ``added``."""
    noisy, cond = noisy.to(prep.weight_dtype), cond.to(prep.weight_dtype)
    if added is None:
        return prep.unet(noisy, t, cond).sample
    return prep.unet(noisy, t, cond, added_cond_kwargs=added).sample


def cached_states(prep, captions, clip_skip):
    """SD1.x: the frozen text encoder's states of ``captions``, each caption encoded once."""
    import torch

    cache = prep.text_cache
    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    if todo:
        with torch.no_grad():
            enc = encode_text(prep.tokenizer, prep.text_encoder, todo, clip_skip, prep.device)
        for c, e in zip(todo, enc):
            cache[c] = e
    return torch.stack([cache[c] for c in captions])


def frozen_conditioning(setup, prep, captions):
    """The frozen encoders' output of ``captions`` (SD1.x: states; SDXL: :class:`.sdxl.SDXLPromptEmbeds`),
    each caption encoded once and kept in ``prep.text_cache`` (sd-scripts' cached outputs)."""
    if prep.arch != "sdxl":
        return cached_states(prep, captions, setup.clip_skip)
    import torch

    from .sdxl import SDXLPromptEmbeds, encode_sdxl_prompts, tokenize_sdxl

    cache = prep.text_cache
    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    if todo:
        ids1, ids2 = tokenize_sdxl(todo, prep.tokenizer, prep.tokenizer_2)
        with torch.no_grad():
            emb = encode_sdxl_prompts(ids1, ids2, prep.text_encoder, prep.text_encoder_2, prep.tokenizer_2.eos_token_id)
        for c, h, p in zip(todo, emb.hidden_states, emb.pooled):
            cache[c] = (h.to(prep.device), p.to(prep.device))
    return SDXLPromptEmbeds(torch.stack([cache[c][0] for c in captions]), torch.stack([cache[c][1] for c in captions]))
