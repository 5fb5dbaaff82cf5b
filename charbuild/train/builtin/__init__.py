"""The builtin LoRA trainer: ``python -m charbuild.train.builtin JOB.json``.

It trains kohya-format LoRA / LoCon / LoHa files for SD1.x and SDXL with diffusers and
transformers, on a GPU when there is one, else on the CPU, and ships tiny deterministic
SD1.5- and SDXL-shaped models (``model.base = "tiny"`` / ``"tiny-sdxl"``) for tests and quick
builds.

Importing this package is cheap: torch, diffusers and transformers are imported only when
:func:`main` runs (doit loads tasks without them).
"""

from __future__ import annotations

import sys
import traceback

from charbuild.errors import CharbuildError


def main(argv: list[str] | None = None) -> int:
    """Run the training job in the JSON file ``argv[0]``; return the process exit code.

    0 on success; otherwise one line ``charbuild.train.builtin: error: <reason>`` on stderr
    (last line) and the error's exit code (1 for a failed run, 2 for an unsupported job or a
    bad command line, 130 when interrupted).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m charbuild.train.builtin JOB.json", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        from ..job import TrainJob
        from .trainer import run_job

        job = TrainJob.from_json(argv[0])

        run_job(job)
        return 0
    except CharbuildError as e:
        _fail(str(e).replace("\n", " "))
        return int(getattr(e, "exit_code", 1) or 1)
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as e:  # a bug or an environment problem: keep the traceback for the log
        traceback.print_exc()
        _fail(f"{type(e).__name__}: {e}".replace("\n", " "))
        return 1


def _fail(message: str) -> None:
    sys.stderr.flush()
    print(f"charbuild.train.builtin: error: {message}", file=sys.stderr, flush=True)
