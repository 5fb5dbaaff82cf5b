"""Pretrain charbuild's demo model (``base = "demo"``) on procedurally drawn characters, on a CPU.

    python scripts/pretrain_demo.py                      # the shipped model: about 40 min on 2 cores
    python scripts/pretrain_demo.py --steps 300 --vae-steps 100 --characters 40 --out /tmp/demo   # a smoke run
    python scripts/pretrain_demo.py --vae-only --work /tmp/vae        # the VAE stage alone (a few min)
    python scripts/pretrain_demo.py --measure charbuild/train/builtin/demo_model   # the shipped VAE

Deterministic from ``--seed`` (with the same torch version and thread count): the pictures
(``scripts/demo_looks.py``), their captions, every initialisation and every batch follow from
it. Stages:

1. *data*: ``--characters`` random looks (the example characters' looks held out), each at
   the 15 face and 15 body template codes, drawn at 128 px, flattened onto white and onto
   black and shrunk to 64 px with Lanczos (as charbuild's image stage does); captions by
   charbuild's caption rules with the keyword and attribute tags (some dropped at random).
2. *tokenizer*: byte-pair merges that make every word of the captions one token
   (:func:`charbuild.train.builtin.demo.train_bpe`); keywords stay byte pieces.
3. *VAE*: ``--vae-steps`` of reconstruction (MSE + L1, and 20x the MSE of the chroma: the
   colours less their grey) of 32 px crops, the posterior's variance
   started tiny (the latents are the means) and a small penalty on the latents' size; the latent
   scaling factor is then 1 / the latents' standard deviation. The stage prints how faithful the
   VAE is (``--vae-only`` stops there; ``--measure`` prints it for a saved model): the identity
   distance of each of the example project's training pictures (64 px, on its character's
   background) to its own round trip, per LoRA's picture set (the floor a LoRA on this VAE can
   reach), those pictures' backgrounds after the round trip (the colour cast the identity metric
   would see), a flat white and a flat black picture's round trip (out of the VAE's domain: its
   group norms see no contrast) and the error in the 2 px frame at the edge against the rest.
   ``--vae-only`` keeps the VAE in ``--work``/vae-only/vae.safetensors.
4. *UNet + text encoder*, together, on the cached latents (half of them mirrored):
   ``--steps`` of epsilon-prediction loss on SD1.5's DDPM schedule, clip skip 2 (the example
   project's), 10 % of captions emptied (classifier-free guidance), AdamW with warm-up and
   cosine decay, an exponential moving average of the weights (what is shipped).

Output: ``demo.safetensors`` (fp16), ``model.json`` (configs, SHA-256, this run's record),
``vocab.json`` and ``merges.txt`` in ``--out`` (default: the package's ``demo_model/``), and
``preview.png`` (sample grid) in ``--work``. ``--save-every`` writes a complete model along the
way, so an interrupted run still leaves a usable one; ``--stop-after N`` ends a run at step N
with the same weights as that checkpoint (the learning-rate schedule still spans ``--steps``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent

import torch  # noqa: E402

from charbuild.train.builtin import demo  # noqa: E402
from demo_looks import BACKGROUNDS, caption_for, draw_item, flatten, pretraining_items  # noqa: E402

CLIP_SKIP = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(seed: int, characters: int, size: int = demo.DEMO_SIZE):
    """(images uint8 [N, 3, size, size], captions, keywords) of the pretraining set."""
    import numpy as np

    rng = random.Random(seed + 1)
    images, captions, keywords = [], [], []
    for ch, code, outfit in pretraining_items(seed, characters):
        rgba = draw_item(ch, code, outfit, 2 * size)
        for bg in sorted(BACKGROUNDS):
            images.append(np.asarray(flatten(rgba, bg, size), dtype=np.uint8))
            captions.append(caption_for(ch, code, outfit, rng))
            keywords.append(ch.keyword)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, keywords


def tokenizer_words(captions: list[str], keywords: list[str]) -> dict[str, int]:
    """Word counts of the captions without the keywords (those stay byte pieces, as a new LoRA's)."""
    words: Counter = Counter()
    for cap, kw in zip(captions, keywords):
        for w in re.findall(r"[a-z]+", cap.lower()):
            if w != kw:
                words[w] += 1
    return dict(words)


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1


def near_deterministic(vae, logvar: float = -12.0) -> None:
    """Start the posterior's log-variance at ``logvar`` (std 0.0025): the latents are (almost) the
    means, as charbuild's trainer caches them, and the decoder need not learn through noise of
    std 1 (with it, 400 steps reconstructed a figure as a blob of its mean colour)."""
    conv = vae.quant_conv
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:].zero_()
        conv.bias[half:].fill_(logvar)


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's colour less its grey level (the mean of its channels)."""
    return x - x.mean(1, keepdim=True)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, gen: torch.Generator, crop: int = 32,
              lr: float = 5e-4) -> list[float]:
    near_deterministic(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * (1 + math.cos(math.pi * s / steps)) / 2))
    vae.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        crop = min(crop, images.shape[-1])
        ox, oy = (int(v) for v in torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=gen))
        x = to_unit(images[idx, :, oy : oy + crop, ox : ox + crop])  # a crop: the VAE is convolutional
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.mean.pow(2).mean()  # keeps the latents' scale in check (the variance stays tiny)
        # the chroma (each pixel less its grey) weighs most: without it the VAE learnt the figures in
        # sepia first and lost their hair colours, what a character LoRA is about
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + 20.0 * (chroma(rec) - chroma(x)).pow(2).mean() + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step in (0, 9):
            log(f"vae {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    return losses


@torch.no_grad()
def recon_preview(vae, images: torch.Tensor, path: Path, n: int = 8) -> None:
    """Pictures (top) and their VAE reconstructions (bottom), to look at."""
    from PIL import Image

    x = to_unit(images[:: max(1, len(images) // n)][:n])
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    size = x.shape[-1]
    sheet = Image.new("RGB", (size * len(x), size * 2))
    for r, row in enumerate((x, rec)):
        for c, img in enumerate(row):
            sheet.paste(Image.fromarray(((img.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()), (c * size, r * size))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)
    log(f"VAE reconstructions: {path}")


def example_pictures(size: int = demo.DEMO_SIZE) -> dict[str, list]:
    """The example project's training pictures as its image stage makes them: each flattened onto
    its character's background and shrunk to ``size`` px with Lanczos; ``{"kuroneko/face": [uint8
    HxWx3, ...], "kuroneko/school": [...], ...}`` (an outfit: its own b?? pictures)."""
    import tomllib

    import numpy as np
    from PIL import Image

    from charbuild.images import flatten

    groups: dict[str, list] = {}
    for toml in sorted((ROOT / "characters").glob("*/character.toml")):
        folder = toml.parent
        background = tomllib.loads(toml.read_text(encoding="utf-8")).get("background", "black")
        sets = [("face", folder / "face")] + [(o.name, o) for o in sorted((folder / "outfits").glob("*")) if o.is_dir()]
        for name, src in sets:
            pics = []
            for png in sorted(src.glob("*.png")):
                with Image.open(png) as img:
                    rgb = flatten(img, background).resize((size, size), Image.Resampling.LANCZOS)
                pics.append(np.asarray(rgb, dtype=np.uint8))
            groups[f"{folder.name}/{name}"] = pics
    return groups


@torch.no_grad()
def roundtrip(vae, pictures) -> list:
    """Each uint8 HxWx3 picture encoded (the posterior's mean) and decoded by ``vae``: uint8 HxWx3."""
    import numpy as np

    x = to_unit(torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2))
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return list(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


@torch.no_grad()
def vae_report(vae) -> dict:
    """How faithful ``vae`` (with its weights rounded to fp16, as shipped) is on the example's pictures:
    per group the mean identity distance of a picture to its own round trip (the floor a LoRA on this
    VAE can reach), and the colour cast: a flat white and a flat black picture's round trip (mean RGB),
    and the mean absolute error of the 2 px frame at the edge against the rest."""
    import copy

    import numpy as np

    from charbuild.identity import distance_arrays

    from charbuild.identity import EDGE, shrink

    vae = copy.deepcopy(vae).half().float().eval()
    out: dict = {"roundtrip": {}}
    frame, inner, backgrounds = [], [], {"white": [], "black": []}
    for group, pics in example_pictures().items():
        recs = roundtrip(vae, pics)
        out["roundtrip"][group] = round(float(np.mean([distance_arrays(r.astype(float), p.astype(float))
                                                       for r, p in zip(recs, pics)])), 3)
        for r, p in zip(recs, pics):
            # the background the identity metric sees: the median of the ring EDGE cells in
            ring = shrink(r.astype(float))[EDGE:-EDGE, EDGE:-EDGE]
            ring = np.concatenate([ring[0], ring[-1], ring[1:-1, 0], ring[1:-1, -1]])
            backgrounds["white" if p[0, 0].mean() > 127 else "black"].append(np.median(ring, axis=0))
            err = np.abs(r.astype(float) - p.astype(float)).mean(-1)
            edge = np.ones_like(err, dtype=bool)
            edge[2:-2, 2:-2] = False
            frame.append(err[edge].mean())
            inner.append(err[~edge].mean())
    size = demo.DEMO_SIZE
    flat = [np.full((size, size, 3), v, np.uint8) for v in (255, 0)]
    for name, rec in zip(("white", "black"), roundtrip(vae, flat)):
        out[name] = [round(float(c), 1) for c in rec[8:-8, 8:-8].reshape(-1, 3).mean(0)]
    for name, meds in backgrounds.items():
        if meds:
            out[f"{name}_background"] = [round(float(c), 1) for c in np.mean(meds, axis=0)]
    out["frame_err"], out["inner_err"] = round(float(np.mean(frame)), 1), round(float(np.mean(inner)), 1)
    return out


def print_vae_report(rep: dict) -> None:
    rt = rep["roundtrip"]
    log("round trip through the VAE, identity distance to itself: "
        + ", ".join(f"{g} {d:.3f}" for g, d in rt.items()) + f" (mean {sum(rt.values()) / len(rt):.3f})")
    log("the example pictures' backgrounds after the round trip (mean RGB of the ring the identity metric "
        "reads): " + ", ".join(f"{k.split('_')[0]} -> {v}" for k, v in rep.items() if k.endswith("_background")))
    log(f"flat white -> {rep['white']}, flat black -> {rep['black']} (mean RGB); mean |error| "
        f"{rep['inner_err']} inside, {rep['frame_err']} in the 2 px frame (0-255)")


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of every picture: [N, 4, h, w] (a mirror image is the mirrored latent)."""
    out = []
    for k in range(0, len(images), batch):
        out.append(vae.encode(to_unit(images[k : k + batch])).latent_dist.mean)
    return torch.cat(out)


def encode_text(tokenizer, text_encoder, captions: list[str]):
    """SD1.x conditioning as charbuild's trainer (clip skip 2: penultimate layer + final layer norm)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-CLIP_SKIP])


class Ema:
    """Exponential moving average of parameters, decay warming up as (1 + n) / (10 + n)."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def swap(self):
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def train_unet(unet, text_encoder, tokenizer, latents, captions, args, gen, on_save):
    from diffusers import DDPMScheduler

    from charbuild.train.builtin.loss import apply_noise_offset
    from charbuild.train.builtin.tiny import SD15_SCHEDULER_CONFIG

    sched = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # the text encoder learns from scratch through the UNet's cross-attention only: at the UNet's
    # learning rate (and token embeddings of std 0.02) its outputs stayed nearly the same for every
    # caption, and the UNet learnt to ignore the words (2000 steps: the loss with the caption, an
    # empty one or a wrong one equal to 4 decimals)
    groups = [{"params": list(unet.parameters()), "lr": args.lr},
              {"params": list(text_encoder.parameters()), "lr": args.lr * args.text_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    warm = 200
    lr_at = lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)) / 2)  # noqa: E731
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = Ema([unet, text_encoder], args.ema)
    unet.train()
    text_encoder.train()
    n = len(captions)
    losses, t0 = [], time.time()
    for step in range(min(args.steps, args.stop_after or args.steps)):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        flip = torch.rand(args.batch, generator=gen) < 0.5
        z0 = torch.where(flip[:, None, None, None], latents[idx].flip(-1), latents[idx])
        caps = [captions[int(i)] for i in idx]
        drop = torch.rand(args.batch, generator=gen) < 0.1
        caps = ["" if d else c for c, d in zip(caps, drop)]
        noise = torch.randn(z0.shape, generator=gen)
        # offset noise: SD1.5's schedule never noises a picture's mean colour away (at t = 999 7 % of
        # the latent is left), so a model trained without it starts every sample at the mean of the
        # latents (which decodes to pink) and cannot reach a black or white background: the first
        # demo models drew black as dark green and white as lilac, whatever a LoRA taught them
        noise = apply_noise_offset(z0, noise, args.noise_offset, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        cond = encode_text(tokenizer, text_encoder, caps)
        pred = unet(a * z0 + s * noise, t, cond).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.update()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step in (0, 9):
            rate = (time.time() - t0) / (step + 1)
            log(f"unet {step + 1}/{args.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                f"({rate:.2f} s/step, {rate * (args.steps - step - 1) / 60:.0f} min left)")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < min(args.steps, args.stop_after or args.steps):
            ema.swap()
            on_save(step + 1, losses)
            ema.swap()
    ema.swap()  # ship the average
    unet.eval()
    text_encoder.eval()
    return losses


def save_model(out: Path, unet, vae, text_encoder, manifest: dict) -> None:
    """Write demo.safetensors (fp16) and model.json (with its SHA-256) into ``out``, each atomically."""
    from safetensors.torch import save_file

    from charbuild.fsutil import write_text_atomic

    state = {}
    for name, module in zip(demo.PARTS, (unet, vae, text_encoder)):
        for k, v in module.state_dict().items():
            if k.endswith("position_ids"):
                continue
            state[f"{name}.{k}"] = v.detach().to(torch.float16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (demo.WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "charbuild": "demo"})
    tmp.chmod(0o644)
    tmp.replace(out / demo.WEIGHTS_FILE)
    manifest = dict(manifest, sha256=demo.sha256_of(out / demo.WEIGHTS_FILE))
    write_text_atomic(out / demo.MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


PREVIEW_PROMPTS = [
    "pink hair, short hair, blue eyes, cat ears",
    "blonde hair, long hair, red eyes, fox ears",
    "blue hair, short hair, green eyes",
    "krnk",
    "black hair, short hair, yellow eyes, cat ears",
    "brown hair, green eyes, cat ears, plugsuit, red plugsuit",
]


@torch.no_grad()
def preview(path: Path, folder: Path, seed: int, steps: int = 20, guidance: float = 7.5) -> None:
    """A grid: rows = PREVIEW_PROMPTS, columns = a few codes; rendered from the saved files as charbuild would."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    from charbuild.captions import caption_text

    from charbuild.train.builtin.tiny import SD15_SCHEDULER_CONFIG

    unet, vae, text_encoder, tokenizer, _ = demo.load_demo_parts(folder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    codes = ["f00", "f02", "f04", "f10", "b00", "b02", "b04", "b20"]
    size = demo.DEMO_SIZE
    sheet = Image.new("RGB", (size * len(codes), size * len(PREVIEW_PROMPTS)), (128, 128, 128))
    for r, lead in enumerate(PREVIEW_PROMPTS):
        prompts = [caption_text(c, ["xqz", lead]) for c in codes]
        cond = encode_text(tokenizer, text_encoder, prompts + [""])
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(codes))]
        out = pipe(prompt_embeds=cond[:-1], negative_prompt_embeds=cond[-1:].expand(len(codes), -1, -1),
                   height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pil").images
        for c, img in enumerate(out):
            sheet.paste(img, (c * size, r * size))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--characters", type=int, default=160)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-crop", type=int, default=64, help="the VAE's training crops, px (64: whole pictures)")
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--vae-only", action="store_true",
                    help="stop after the VAE stage (writes nothing into --out) and print its round trips")
    ap.add_argument("--measure", type=Path, default=None, metavar="MODEL_DIR",
                    help="only print the round trips of the VAE of a saved demo model (e.g. the shipped one)")
    ap.add_argument("--steps", type=int, default=3200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--text-lr-mult", type=float, default=5.0, help="the text encoder's lr: this times --lr")
    ap.add_argument("--token-std", type=float, default=1.0, help="std of the text encoder's initial token embeddings")
    ap.add_argument("--noise-offset", type=float, default=0.1,
                    help="offset noise of the UNet stage (sd-scripts' --noise_offset): lets samples reach black and white")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--threads", type=int, default=1)  # two threads on two busy cores ran 7x slower
    ap.add_argument("--save-every", type=int, default=400)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end after this many steps (the schedule still spans --steps): equals the --save-every "
                         "checkpoint of a full run at that step")
    ap.add_argument("--out", type=Path, default=demo.DEMO_DIR)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "pretrain-demo")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print_vae_report(vae_report(demo.load_demo_parts(args.measure)[1]))
        return 0
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    log(f"drawing {args.characters} characters x 30 codes x 2 backgrounds")
    images, captions, keywords = make_data(args.seed, args.characters)
    log(f"{len(images)} pictures; e.g. {captions[0]!r}")
    if args.vae_only:
        args.out = args.work / "vae-only"
    args.out.mkdir(parents=True, exist_ok=True)
    vocab_size = demo.write_tokenizer_files(args.out, demo.train_bpe(tokenizer_words(captions, keywords)))
    tokenizer = demo.load_tokenizer(args.out)
    longest = max(len(tokenizer(c).input_ids) for c in captions)
    log(f"tokenizer: {vocab_size} tokens, longest caption {longest} of {demo.DEMO_MAX_LENGTH}")

    manifest = {"unet": demo.unet_config(), "vae": demo.vae_config(), "text_encoder": demo.text_config(vocab_size)}
    unet, vae, text_encoder = demo.build_components(manifest)
    if args.token_std:
        # tokens, not positions, dominate the text encoder's input from the start (see train_unet)
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight.normal_(0.0, args.token_std, generator=gen)
    vae_losses = train_vae(vae, images, args.vae_steps, args.batch, gen, crop=args.vae_crop, lr=args.vae_lr)
    recon_preview(vae, images, args.work / "vae.png")
    report = vae_report(vae)
    print_vae_report(report)
    if args.vae_only:
        from safetensors.torch import save_file

        save_file({k: v.detach().half().contiguous() for k, v in vae.state_dict().items()}, str(args.out / "vae.safetensors"))
        log(f"VAE stage done in {(time.time() - started) / 60:.1f} min")
        return 0
    latents = encode_latents(vae, images)
    scale = float(1 / latents.std())
    manifest["vae"]["scaling_factor"] = round(scale, 5)
    vae.register_to_config(scaling_factor=round(scale, 5))
    latents = latents * round(scale, 5)
    log(f"latents {tuple(latents.shape)}, scaling factor {scale:.4f}")

    def record(step: int, losses: list[float]) -> dict:
        return {"training": {
            "script": "scripts/pretrain_demo.py", "seed": args.seed, "characters": args.characters,
            "pictures": len(images), "vae_steps": args.vae_steps,
            "vae_crop": args.vae_crop, "vae_lr": args.vae_lr, "vae_roundtrip": report, "steps": args.steps, "saved_at_step": step,
            "batch": args.batch, "lr": args.lr, "text_lr_mult": args.text_lr_mult,
            "token_std": args.token_std, "noise_offset": args.noise_offset, "ema": args.ema, "clip_skip": CLIP_SKIP, "threads": args.threads,
            "torch": torch.__version__, "minutes": round((time.time() - started) / 60, 1),
            "vae_loss": round(sum(vae_losses[-50:]) / max(1, len(vae_losses[-50:])), 5),
            "unet_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 5),
        }}  # fmt: skip

    def on_save(step: int, losses: list[float]) -> None:
        save_model(args.out, unet, vae, text_encoder, {**manifest, **record(step, losses)})
        log(f"saved the model at step {step} to {args.out}")

    losses = train_unet(unet, text_encoder, tokenizer, latents, captions, args, gen, on_save)
    on_save(len(losses), losses)
    (args.work / "losses.json").write_text(json.dumps({"vae": vae_losses, "unet": losses}), encoding="utf-8")
    preview(args.work / "preview.png", args.out, args.seed)
    log(f"done in {(time.time() - started) / 60:.1f} min; preview: {args.work / 'preview.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
