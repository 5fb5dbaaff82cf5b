"""The fake backend's ``samples:`` renderer: ``python -m charbuild.train.fake_samples REQUEST.json``.

A fake training's LoRA is a stand-in no model can render, so, as its trainings do, this writes
a stand-in picture per sample (a square of one colour from the sample's seed, prompt and step) into
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
from ..signature import file_md5


def render_fake_samples(request: dict) -> list[Path]:
    """Write the stand-in samples of ``request``; the files written. An exploration's request
    (``rows``, :mod:`charbuild.train.explore_action`) gets one folder ``explore/<row>/`` per row,
    its colours also from the row's file and weights."""
    if "rows" in request:
        written = []
        for row in request["rows"]:
            salt = json.dumps([file_md5(row["file"]) if row.get("file") else None, row.get("weights")], sort_keys=True)
            written += _stand_ins(request, Path(request["folder"]) / "explore" / row["name"], salt)
        return written
    return _stand_ins(request, Path(request["folder"]) / "samples" / str(int(request["step"])), str(request["step"]))


def _stand_ins(request: dict, folder: Path, salt: str) -> list[Path]:
    from PIL import Image, PngImagePlugin

    written = []
    for name, prompt, index in request["samples"]:
        seed = int(request["seed"]) + int(index)
        digest = hashlib.sha256(f"{seed}:{prompt}:{salt}".encode("utf-8")).digest()
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", f"{prompt}\nSteps: 0, Sampler: fake, Seed: {seed}, Size: 16x16")
        buf = io.BytesIO()
        picture = Image.new("RGB", (16, 16), (40, 40, 40))  # a "figure" of the digest's colour on grey
        picture.paste(tuple(digest[:3]), (4, 4, 12, 12))
        picture.save(buf, format="PNG", pnginfo=info)
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
