"""A fake training backend for tests and demos: ``python -m charbuild.train.fake_trainer JOB.json``.

It trains nothing; it behaves like a trainer from the outside (its knobs are in the job's
opaque ``trainer.extra`` table, ``[trainer.extra]`` in a project):

- prints its pid (and progress with ``\\r`` while it waits ``fake_seconds``),
- with ``fake_grandchild`` starts a sleeping child process (to test that
  stopping a training stops the whole process group),
- with ``fake_fail`` prints an error and exits with status 1,
- appends one JSON line ``{"lora", "variant", "gpu", "start", "end", "pid", "ok"}``
  to ``fake_record`` if set (relative to the project root; one ``O_APPEND`` write: safe
  for concurrent runs),
- writes a small but valid LoRA to the job's ``output`` atomically,
- and beside it what a real trainer shows (:func:`write_fake_observations`): ``metrics.jsonl``
  (a made-up falling loss per step, ``val_loss`` every ``validation_every`` steps) and, with
  ``sample_every``, an 8x8 PNG per sample at each sample step (``samples/<step>/<name>.png``).

The LoRA holds a handful of real module stems (SD1.5 or SDXL names and shapes) in
the format the params ask for (kohya LoRA / LoCon keys, or LoHa ``hada_*`` keys),
rank ``min(dim, 8)`` with alpha scaled to keep ``alpha / rank``, and sd-scripts'
``ss_*`` and ``modelspec.*`` metadata (``modelspec.trigger_phrase`` = the keywords).
Its bytes are a function of the seed, the params and the input files' contents
only, so an identical re-run writes an identical file. Uses numpy, not torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .job import TrainJob

MAX_FAKE_RANK = 8

# (stem, kind, in, out); kind: "linear" | "conv1" (1x1) | "conv3" (3x3, only with conv_dim)
_SD15_MODULES = (
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "linear", 768, 768),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "linear", 320, 320),
    ("lora_unet_up_blocks_1_attentions_0_proj_in", "conv1", 1280, 1280),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "conv3", 320, 320),
)
_SDXL_MODULES = (
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "linear", 768, 768),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "linear", 640, 640),
    ("lora_unet_output_blocks_0_1_proj_in", "linear", 1280, 1280),
    ("lora_unet_input_blocks_1_0_in_layers_2", "conv3", 320, 320),
)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def inputs_digest(inputs, root: str | Path | None = None) -> str:
    """SHA-256 over the (relative path, MD5) of every input file, in sorted order."""
    from ..signature import file_md5

    h = hashlib.sha256()
    for p in sorted(Path(x) for x in inputs):
        key = Path(os.path.relpath(p, root)).as_posix() if root else p.name
        h.update(f"{key}\0{file_md5(p)}\n".encode("utf-8"))
    return h.hexdigest()


def tag_frequency(inputs, root: str | Path | None = None) -> dict[str, dict[str, int]]:
    """sd-scripts' ``ss_tag_frequency``: per caption folder, how often each tag occurs."""
    freq: dict[str, Counter] = {}
    for p in sorted(Path(x) for x in inputs):
        if p.suffix != ".txt":
            continue
        folder = Path(os.path.relpath(p.parent, root)).as_posix() if root else p.parent.name
        tags = [t.strip() for t in p.read_text(encoding="utf-8").split(",") if t.strip()]
        freq.setdefault(folder, Counter()).update(tags)
    return {k: dict(sorted(v.items())) for k, v in sorted(freq.items())}


def fake_lora_tensors(params: Mapping[str, Any], *, arch: str = "sd15", seed_material: str = "") -> dict:
    """The tensors of a fake LoRA (numpy arrays) for ``params`` (a TrainParams dict)."""
    import numpy as np

    from .variants import canonical_params_text

    digest = hashlib.sha256(
        f"{params.get('seed', 0)}\0{canonical_params_text(params)}\0{seed_material}".encode("utf-8")
    ).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    dtype = np.float16 if params.get("save_precision", "fp16") == "fp16" else np.float32
    loha = params.get("algo") == "loha"
    tensors = {}
    for stem, kind, n_in, n_out in _SDXL_MODULES if arch == "sdxl" else _SD15_MODULES:
        if kind == "conv3":
            if not params.get("conv_dim"):
                continue
            dim, alpha = params["conv_dim"], params["conv_alpha"]
        else:
            dim, alpha = params["dim"], params["alpha"]
        r = min(int(dim), MAX_FAKE_RANK)
        a = float(alpha) * r / float(dim)
        k = 3 if kind == "conv3" else 1
        if loha:
            fan_in = n_in * k * k
            for i in (1, 2):
                tensors[f"{stem}.hada_w{i}_a"] = (rng.standard_normal((n_out, r)) * 0.05).astype(dtype)
                tensors[f"{stem}.hada_w{i}_b"] = (rng.standard_normal((r, fan_in)) * 0.05).astype(dtype)
        else:
            down = rng.standard_normal((r, n_in * k * k)) / np.sqrt(n_in * k * k)
            up = rng.standard_normal((n_out, r)) * 0.01
            if kind == "linear":
                tensors[f"{stem}.lora_down.weight"] = down.astype(dtype)
                tensors[f"{stem}.lora_up.weight"] = up.astype(dtype)
            else:
                tensors[f"{stem}.lora_down.weight"] = down.reshape(r, n_in, k, k).astype(dtype)
                tensors[f"{stem}.lora_up.weight"] = up.reshape(n_out, r, 1, 1).astype(dtype)
        tensors[f"{stem}.alpha"] = np.array(a, dtype=dtype)
    return tensors


def fake_lora_metadata(
    params: Mapping[str, Any],
    *,
    arch: str = "sd15",
    name: str,
    keywords=(),
    tag_freq: Mapping[str, Any] | None = None,
    comment: str = "charbuild fake backend: not a trained LoRA",
) -> dict[str, str]:
    """sd-scripts-style ``ss_*`` and ``modelspec.*`` header metadata (all strings)."""
    from .job import scheduler_in_effect

    r = min(int(params["dim"]), MAX_FAKE_RANK)
    alpha = float(params["alpha"]) * r / float(params["dim"])
    net_args: dict[str, str] = {}
    if params.get("conv_dim"):
        rc = min(int(params["conv_dim"]), MAX_FAKE_RANK)
        net_args["conv_dim"] = str(rc)
        net_args["conv_alpha"] = _fmt(float(params["conv_alpha"]) * rc / float(params["conv_dim"]))
    if params.get("algo"):
        net_args["algo"] = params["algo"]
    lycoris = params.get("network_module") == "lycoris.kohya"
    sdxl = arch == "sdxl"
    meta = {
        "ss_network_module": params["network_module"],
        "ss_network_dim": str(r),
        "ss_network_alpha": _fmt(alpha),
        "ss_network_args": json.dumps(net_args, sort_keys=True),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_output_name": name,
        "ss_training_comment": comment,
        "ss_max_train_steps": str(params["steps"]),
        "ss_seed": str(params.get("seed", 0)),
        "ss_optimizer": str(params["optimizer"]),
        "ss_lr_scheduler": scheduler_in_effect(
            params["optimizer"], params.get("optimizer_args"), params.get("scheduler") or "constant"
        ),
        "ss_learning_rate": str(params.get("lr")),
        "ss_text_encoder_lr": str(params.get("text_encoder_lr")),
        "ss_mixed_precision": str(params.get("mixed_precision")),
        "ss_tag_frequency": json.dumps(tag_freq or {}, sort_keys=True, ensure_ascii=False),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1")
        + ("/lycoris" if lycoris else "/lora"),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(keywords),
        "modelspec.description": comment,
    }
    if not sdxl and params.get("clip_skip"):
        meta["ss_clip_skip"] = str(params["clip_skip"])
    return meta


def write_fake_lora(
    path: str | Path,
    params: Mapping[str, Any],
    *,
    arch: str = "sd15",
    name: str,
    keywords=(),
    seed_material: str = "",
    tag_freq: Mapping[str, Any] | None = None,
) -> Path:
    """Write a small valid LoRA for ``params`` to ``path`` atomically; return the path."""
    from ..fsutil import write_bytes_atomic

    tensors = fake_lora_tensors(params, arch=arch, seed_material=seed_material)
    meta = fake_lora_metadata(params, arch=arch, name=name, keywords=keywords, tag_freq=tag_freq)
    write_bytes_atomic(path, safetensors_bytes(tensors, meta))
    return Path(path)


_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32"}


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file with a byte-stable layout (sorted header keys and tensors).

    ``safetensors.numpy.save`` orders the metadata through a hash map, so the same
    input can give different bytes; a fake run must give identical bytes.
    """
    import numpy as np

    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def fake_loss(step: int, seed: int) -> float:
    """A made-up training loss that falls with ``step`` (deterministic)."""
    wobble = (hashlib.sha256(f"{seed}:{step}".encode()).digest()[0] / 255.0 - 0.5) * 0.02
    return round(0.05 + 0.1 / (1.0 + 0.05 * step) + wobble, 6)


def _png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    """A ``size`` x ``size`` PNG of one colour (zlib + struct only: no imaging library needed)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + bytes(rgb) * size
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * size, 9)) + chunk(b"IEND", b""))


def write_fake_observations(job: "TrainJob") -> list[Path]:
    """``metrics.jsonl`` and the samples of ``job`` beside its output; the files written."""
    from ..fsutil import write_bytes_atomic
    from ..sample_prompts import sample_steps_due
    from .metrics import MetricsWriter
    from .observed import output_folder, samples_of

    params, folder = job.params, output_folder(job)
    written = []
    with MetricsWriter(folder) as metrics:
        if params.validation_every:
            metrics.validation(0, fake_loss(0, params.seed) + 0.01)
        for step in range(1, params.steps + 1):
            metrics.step(step, fake_loss(step, params.seed), params.lr)
            if params.validation_every and (step % params.validation_every == 0 or step == params.steps):
                metrics.validation(step, fake_loss(step, params.seed) + 0.01)
        written.append(metrics.path)
    if params.sample_every:
        samples = samples_of(job)
        for step in range(1, params.steps + 1):
            if not sample_steps_due(step, params.sample_every, params.steps):
                continue
            for s in samples:
                digest = hashlib.sha256(f"{s.seed(params.seed)}:{s.prompt}:{step}".encode("utf-8")).digest()
                path = folder / "samples" / str(step) / f"{s.name}.png"
                write_bytes_atomic(path, _png((digest[0], digest[1], digest[2])))
                written.append(path)
    return written


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` with a single ``O_APPEND`` write."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def run_fake(job: TrainJob) -> int:
    """Do what the fake backend does for ``job`` (see the module doc); return the exit status.

    Its test knobs come from the job's opaque ``trainer.extra`` table.
    """
    knobs = job.trainer.extra
    params = job.params.to_dict()
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"fake trainer pid={os.getpid()} lora={job.lora} variant={job.variant} gpu={gpu}", flush=True)
    grandchild = None
    if knobs.get("fake_grandchild"):
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"fake trainer grandchild pid={grandchild.pid}", flush=True)
    start = time.time()
    seconds = float(knobs.get("fake_seconds", 0) or 0)
    steps = job.params.steps
    while (elapsed := time.time() - start) < seconds:
        step = min(steps, int(steps * elapsed / seconds) + 1)
        print(f"\rsteps: {step}/{steps}", end="", flush=True)
        time.sleep(min(0.1, max(0.0, seconds - elapsed)))
    print(f"\rsteps: {steps}/{steps}", flush=True)
    ok = not knobs.get("fake_fail")
    if ok:
        root = job.project_root
        write_fake_lora(
            job.output,
            params,
            arch=job.model.arch,
            name=job.title,
            keywords=job.keywords,
            seed_material=inputs_digest(job.inputs, root),
            tag_freq=tag_frequency(job.inputs, root),
        )
        print(f"fake trainer: wrote {job.output}", flush=True)
        observed = write_fake_observations(job)
        print(f"fake trainer: wrote metrics.jsonl and {len(observed) - 1} sample(s)", flush=True)
    else:
        print("fake trainer: failing as asked (trainer.extra.fake_fail)", file=sys.stderr, flush=True)
    if grandchild is not None:
        grandchild.kill()
        grandchild.wait()
    if knobs.get("fake_record"):
        record = {
            "lora": job.lora,
            "variant": job.variant,
            "gpu": gpu,
            "start": start,
            "end": time.time(),
            "pid": os.getpid(),
            "ok": ok,
        }
        # a relative path is the project's: the runner starts every backend in the project root
        append_record(Path(job.project_root) / knobs["fake_record"], record)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m charbuild.train.fake_trainer JOB.json``."""
    from .job import TrainJob

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m charbuild.train.fake_trainer JOB.json", file=sys.stderr)
        return 2
    return run_fake(TrainJob.from_json(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
