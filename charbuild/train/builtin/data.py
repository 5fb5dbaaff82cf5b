"""Dataset TOML reading (sd-scripts' format), bucketing, batching and the latent cache.

Reads the keys of lora-formats.md §5 the way sd-scripts resolves them: a subset's value, else
its dataset's, else ``[general]``'s, else sd-scripts' default. ``image_dir`` is relative to the
project root. Captions come from ``<image stem><caption_extension>`` beside each image, else
the subset's ``class_tokens``.

Bucketing: with ``bucket_no_upscale`` (charbuild's default) an image keeps its size, shrunk
to fit the dataset's resolution area if larger, and rounded *down* to ``bucket_reso_steps``
(64) with a centre crop; images are already prepared to size, so this is nearly always the
image size. Without it, buckets are sd-scripts-style sizes between min/max_bucket_reso with
area ≤ resolution area, and an image goes to the bucket of nearest aspect ratio (resized to
cover, centre-cropped). Without ``enable_bucket`` every image is resized/cropped to
``resolution``.

Batches never mix buckets or datasets, and hold at most the dataset's ``batch_size``.

Latents are cached once (sd-scripts' ``--cache_latents``), so ``color_aug`` (which the SD1.x
dataset TOML keeps from the original generator) does not apply: it is read and ignored without
a note, since charbuild wrote it and the user cannot change it. ``random_crop`` and
``shuffle_caption`` are ignored with a note.
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from charbuild.errors import TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_DEFAULTS = {
    "resolution": 512,
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "num_repeats": 1,
    "caption_extension": ".caption",
    "class_tokens": None,
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
    "shuffle_caption": False,
    "keep_tokens": 0,
    "caption_prefix": None,
    "caption_suffix": None,
    "is_reg": False,
}


@dataclass
class ImageItem:
    """One training image of one subset, with its caption and bucket."""

    path: Path
    caption: str
    bucket: tuple[int, int]  # (width, height) in pixels
    resized: tuple[int, int]  # size the image is resized to before the centre crop
    num_repeats: int
    flip_aug: bool
    dataset_index: int
    original: tuple[int, int] = (0, 0)  # (width, height) of the file, before any resize (SDXL's size ids)


@dataclass
class DatasetInfo:
    """One ``[[datasets]]`` entry after resolution of defaults."""

    index: int
    batch_size: int
    resolution: tuple[int, int]
    items: list[ImageItem] = field(default_factory=list)
    # sd-scripts: {basename(image_dir): {tag: count}}, merged over subsets of the dataset
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    dirs: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class Dataset:
    """The whole dataset TOML, resolved."""

    datasets: list[DatasetInfo]
    notes: list[str]

    @property
    def items(self) -> list[ImageItem]:
        """Every image of every dataset."""
        return [it for ds in self.datasets for it in ds.items]

    @property
    def num_train_images(self) -> int:
        """Images × repeats, as sd-scripts counts ``ss_num_train_images``."""
        return sum(it.num_repeats for it in self.items)

    def _by_dir_name(self, field: str) -> dict[str, dict[str, int]]:
        """Each dataset's ``field`` (a dict by directory name) merged: the first dataset that
        uses a directory name wins, as in sd-scripts' metadata."""
        out: dict[str, dict[str, int]] = {}
        for ds in self.datasets:
            for name, value in getattr(ds, field).items():
                out.setdefault(name, value)
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``ss_tag_frequency``: {dir name: {tag: count}}."""
        return self._by_dir_name("tag_frequency")

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """``ss_dataset_dirs``: {dir name: {n_repeats, img_count}}."""
        return self._by_dir_name("dirs")


def _resolution(value, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise TrainingError(f"{where}: resolution must be an int or [width, height], not {value!r}")


def _caption_for(image: Path, ext: str, class_tokens: str | None) -> str | None:
    cap = image.with_name(image.stem + ext)
    if cap.is_file():
        text = cap.read_text(encoding="utf-8").strip()
        if text:
            return text.splitlines()[0].strip()
    return class_tokens


def add_tag_frequency(freq: dict[str, int], caption: str) -> None:
    """Count tags the way sd-scripts does for ``ss_tag_frequency`` (comma split, strip, lower)."""
    for tag in caption.split(","):
        tag = tag.strip()
        if tag:
            tag = tag.lower()
            freq[tag] = freq.get(tag, 0) + 1


def make_buckets(max_area: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """sd-scripts-style bucket sizes: width/height multiples of ``step`` with area ≤ max_area."""
    buckets = set()
    w = min_reso
    while w <= max_reso:
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    side = int(math.sqrt(max_area)) // step * step
    buckets.add((side, side))
    return sorted(buckets)


def choose_bucket(size: tuple[int, int], ds: dict, resolution: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized): the (width, height) an image of ``size`` trains at, and the size it is
    resized to before the centre crop to that bucket, under the dataset's bucket settings."""
    w, h = size
    step = int(ds["bucket_reso_steps"])
    max_area = resolution[0] * resolution[1]

    def cover(b):
        s = max(b[0] / w, b[1] / h)
        return b, (max(b[0], round(w * s)), max(b[1], round(h * s)))

    if not ds["enable_bucket"]:
        return cover(resolution)
    if ds["bucket_no_upscale"]:
        rw, rh = w, h
        if w * h > max_area:  # shrink to the area, keep the aspect ratio (sd-scripts)
            s = math.sqrt(max_area / (w * h))
            rw, rh = max(1, round(w * s)), max(1, round(h * s))
        bucket = (max(step, rw // step * step), max(step, rh // step * step))
        if bucket[0] > rw or bucket[1] > rh:  # image smaller than one step: upscale to cover
            return cover(bucket)
        return bucket, (rw, rh)
    buckets = make_buckets(max_area, int(ds["min_bucket_reso"]), int(ds["max_bucket_reso"]), step)
    ar = w / h
    return cover(min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(ar)), -b[0] * b[1])))


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' ``BucketManager.get_crop_ltrb``: (left, top, right, bottom) of the picture
    fitted inside ``bucket`` (both (width, height)), the "crop" SDXL's size conditioning is told.

    This is Stability AI's preprocessing as sd-scripts reproduces it (the offsets of the fitted,
    not the covering, picture); right is kept for the flipped picture.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket[1] * image_ar, bucket[1]
    else:
        resized_w, resized_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - resized_w) // 2
    top = (bucket[1] - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def sdxl_size_conditioning(item: ImageItem, flipped: bool) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(original (h, w), crop (top, left), target (h, w)) of one training picture, as sd-scripts'
    dataset gives SDXL's ``time_ids``: the file's size, :func:`crop_ltrb` (mirrored for a
    flipped picture) and the bucket."""
    left, top, right, _ = crop_ltrb(item.bucket, item.original)
    if flipped:
        left = item.bucket[0] - right
    return (int(item.original[1]), int(item.original[0])), (int(top), int(left)), (int(item.bucket[1]), int(item.bucket[0]))


def read_dataset_toml(toml_path: str | Path, project_root: str | Path, overrides: dict | None = None) -> Dataset:
    """Read a dataset TOML into datasets of captioned, bucketed images.

    ``overrides`` (e.g. resolution/min_bucket_reso/max_bucket_reso from the training params)
    apply to every dataset when not None.
    """
    from PIL import Image

    toml_path = Path(toml_path)
    root = Path(project_root)
    try:
        conf = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainingError(f"cannot read dataset TOML: {e}", path=toml_path) from e
    general = conf.get("general", {})
    notes: list[str] = []
    out: list[DatasetInfo] = []
    for di, dconf in enumerate(conf.get("datasets", [])):
        ds = dict(_DEFAULTS)
        ds.update({k: v for k, v in general.items() if k != "subsets"})
        ds.update({k: v for k, v in dconf.items() if k != "subsets"})
        for k, v in (overrides or {}).items():
            if v is not None:
                ds[k] = v
        resolution = _resolution(ds["resolution"], f"{toml_path}: datasets[{di}]")
        info = DatasetInfo(index=di, batch_size=max(1, int(ds["batch_size"])), resolution=resolution)
        for si, sconf in enumerate(dconf.get("subsets", [])):
            sub = dict(ds)
            sub.update(sconf)
            if "image_dir" not in sub:
                raise TrainingError(f"datasets[{di}].subsets[{si}] has no image_dir", path=toml_path)
            if sub.get("is_reg"):
                notes.append(f"datasets[{di}].subsets[{si}]: regularisation subsets are not supported; skipped")
                continue
            image_dir = (root / sub["image_dir"]).resolve()
            if not image_dir.is_dir():
                raise TrainingError(f"image_dir {sub['image_dir']!r} is not a folder (relative to {root})", path=toml_path)
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            dir_name = Path(sub["image_dir"]).name
            freq = info.tag_frequency.setdefault(dir_name, {})
            repeats = max(1, int(sub["num_repeats"]))
            for img in images:
                caption = _caption_for(img, sub["caption_extension"], sub["class_tokens"])
                if caption is None:
                    raise TrainingError(f"{img.name} has no caption file and its subset no class_tokens", path=img)
                if sub.get("caption_prefix"):
                    caption = f"{sub['caption_prefix']}{caption}"
                if sub.get("caption_suffix"):
                    caption = f"{caption}{sub['caption_suffix']}"
                add_tag_frequency(freq, caption)
                with Image.open(img) as im:
                    size = im.size
                bucket, resized = choose_bucket(size, ds, resolution)
                info.items.append(ImageItem(img, caption, bucket, resized, repeats, bool(sub["flip_aug"]), di, size))
            d = info.dirs.setdefault(dir_name, {"n_repeats": repeats, "img_count": 0})
            d["img_count"] += len(images)
            if sub.get("random_crop"):
                notes.append("random_crop is ignored: the builtin trainer caches latents (centre crop)")
            if sub.get("shuffle_caption"):
                notes.append("shuffle_caption is ignored: tag order is kept")
        out.append(info)
    notes = list(dict.fromkeys(notes))
    dataset = Dataset(out, notes)
    if not dataset.items:
        raise TrainingError("the dataset TOML names no training images", path=toml_path)
    return dataset


def load_image_tensor(path: Path, bucket: tuple[int, int], resized: tuple[int, int] | None = None):
    """The image as a (3, H, W) float tensor in [-1, 1]: resized to ``resized`` (default: just
    covering ``bucket``), then centre-cropped to ``bucket``. Transparency is flattened on white."""
    import numpy as np
    import torch
    from PIL import Image

    from charbuild.images import flatten

    bw, bh = bucket
    with Image.open(path) as im:
        im = flatten(im, "white")  # the project's one way (tRNS and 16-bit grey too)
        w, h = im.size
        if resized is None:
            scale = max(bw / w, bh / h)
            resized = (max(bw, round(w * scale)), max(bh, round(h * scale)))
        if tuple(resized) != (w, h):
            im = im.resize(tuple(resized), Image.LANCZOS)
        w, h = im.size
        left, top = (w - bw) // 2, (h - bh) // 2
        im = im.crop((left, top, left + bw, top + bh))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def cache_latents(dataset: Dataset, vae, device, seed: int, batch_size: int = 1, progress=None) -> dict:
    """Encode every image once (and its mirror image for flip_aug subsets).

    ``batch_size`` pictures go through the VAE at a time: one, as sd-scripts' ``--vae_batch_size``
    default (an SDXL VAE in fp32 takes ~10 GiB for four 1024 px pictures).
    Returns {(item index, flipped): latent (4, h, w) float32 on the CPU}. Latents are sampled
    from the VAE's distribution with a generator seeded from ``seed`` (deterministic) and
    multiplied by the VAE's scaling factor.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    jobs: list[tuple[int, bool]] = []
    for i, it in enumerate(dataset.items):
        jobs.append((i, False))
        if it.flip_aug:
            jobs.append((i, True))
    items = dataset.items
    groups: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    for j in jobs:
        groups.setdefault(items[j[0]].bucket, []).append(j)
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    vae_dtype = next(vae.parameters()).dtype
    cache = {}
    with torch.no_grad():
        for bucket in sorted(groups):
            todo = groups[bucket]
            for k in range(0, len(todo), batch_size):
                chunk = todo[k : k + batch_size]
                imgs = []
                for idx, flip in chunk:
                    t = load_image_tensor(items[idx].path, bucket, items[idx].resized)
                    imgs.append(torch.flip(t, dims=[2]) if flip else t)
                x = torch.stack(imgs).to(device, vae_dtype)
                dist = vae.encode(x).latent_dist
                noise = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(device, dist.mean.dtype)
                lat = (dist.mean + dist.std * noise) * scaling
                for (idx, flip), l in zip(chunk, lat.float().cpu()):
                    cache[(idx, flip)] = l
                if progress is not None:
                    progress(len(chunk))
    return cache


def make_batches(dataset: Dataset, rng: random.Random) -> list[list[tuple[int, bool]]]:
    """One epoch of batches: items × repeats, grouped per (dataset, bucket), shuffled.

    Each entry is (item index, flipped); flipped is drawn at random for flip_aug items.
    """
    groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for i, it in enumerate(dataset.items):
        groups.setdefault((it.dataset_index, it.bucket), []).extend([i] * it.num_repeats)
    batches = []
    for key in sorted(groups):
        idxs = groups[key]
        rng.shuffle(idxs)
        bs = dataset.datasets[key[0]].batch_size
        for k in range(0, len(idxs), bs):
            batches.append(
                [(i, bool(dataset.items[i].flip_aug and rng.random() < 0.5)) for i in idxs[k : k + bs]]
            )
    rng.shuffle(batches)
    return batches
