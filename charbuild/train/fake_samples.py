"""The fake backend's ``samples:`` renderer: ``python -m charbuild.train.fake_samples REQUEST.json``.

A fake training's LoRA is a stand-in no model can render, so, as its trainings do, this writes
a stand-in picture per sample (one colour from the sample's seed, prompt and step) into
``<folder>/samples/<step>/<name>.png``, with the ``parameters`` text a real sample carries.
The request is :func:`charbuild.train.samples_action.request`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

from ..fsutil import write_bytes_atomic


def render_fake_samples(request: dict) -> list[Path]:
    """Write the stand-in samples of ``request``; the files written."""
    from PIL import Image, PngImagePlugin

    folder = Path(request["folder"]) / "samples" / str(int(request["step"]))
    written = []
    for name, prompt, index in request["samples"]:
        seed = int(request["seed"]) + int(index)
        digest = hashlib.sha256(f"{seed}:{prompt}:{request['step']}".encode("utf-8")).digest()
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", f"{prompt}\nSteps: 0, Sampler: fake, Seed: {seed}, Size: 8x8")
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), tuple(digest[:3])).save(buf, format="PNG", pnginfo=info)
        write_bytes_atomic(folder / f"{name}.png", buf.getvalue())
        written.append(folder / f"{name}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    print(f"fake samples: {len(render_fake_samples(request))} stand-in pictures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
