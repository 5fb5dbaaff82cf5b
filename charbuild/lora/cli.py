"""Click commands of the LoRA toolkit: ``inspect``, ``merge``, ``compress``, ``combine``.

The main ``charbuild`` group adds them with ``for c in COMMANDS: main.add_command(c)``. User
errors (bad files, bad weights) are CharbuildErrors, printed by ``charbuild``'s one handler as
every other command's are (``FILE: error: message``, or ``charbuild: error: message``), never
tracebacks.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from charbuild.errors import CharbuildError, OptionError


def _user_errors(fn):
    """A bad value (ValueError) becomes an OptionError for the one handler, and the toolkit's
    SDXL-list notes warning lines."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        from charbuild.lora.blocks import SdxlListWarning

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SdxlListWarning)
                try:
                    return fn(*args, **kwargs)
                finally:
                    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, SdxlListWarning)):
                        click.echo(f"charbuild: warning: {message}", err=True)
        except CharbuildError:
            raise
        except ValueError as err:
            raise OptionError(str(err)) from None

    return wrapper


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@_user_errors
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Describe a LoRA file: format, arch, modules per block, ranks, alphas, metadata."""
    from charbuild.lora.inspect import format_inspection, inspect_lora

    info = inspect_lora(file)
    click.echo(json.dumps(info, indent=2, ensure_ascii=False) if as_json else format_inspection(info))


def _weights_spec(weights: str, preset_file: Path | None) -> tuple[object, dict[str, list[float]]]:
    """``(spec, presets)`` for resolve_block_weights from the --weights text and --preset-file."""
    presets: dict[str, list[float]] = {}
    if preset_file is not None:
        presets.update(_read_presets(preset_file))
    text = weights.strip()
    if ":" in text and "," not in text.rsplit(":", 1)[1]:
        file_part, name = text.rsplit(":", 1)
        if file_part.endswith(".txt") or Path(file_part).is_file():
            presets.update(_read_presets(Path(file_part)))
            return name, presets
    if text.endswith(".txt"):
        raise ValueError(f"--weights {text}: give FILE.txt:NAME to pick a preset from a preset file")
    return text, presets


def _read_presets(path: Path) -> dict[str, list[float]]:
    from charbuild.lora.blocks import parse_preset_file

    if not path.is_file():
        raise ValueError(f"{path}: no such preset file")
    return parse_preset_file(path.read_text(encoding="utf-8"), str(path))


@click.command("merge")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--weights", "-w", required=True, help="Preset name (FACE, BODY, OUTALL…), v1,v2,… (12/17/20/26), or FILE.txt:NAME.")
@click.option("--preset-file", type=click.Path(dir_okay=False, path_type=Path), help="LBW preset file (NAME:v1,…) adding presets.")
@click.option("--keyword", "keywords", multiple=True, help="Trigger word to record (repeatable).")
@click.option("--note", help="Free text recorded in the metadata.")
@_user_errors
def merge_cmd(src: Path, dst: Path, weights: str, preset_file: Path | None, keywords: tuple[str, ...], note: str | None) -> None:
    """Bake block weights into a LoRA (as the LBW extension applies them; fractional/negative OK)."""
    from charbuild.lora.merge import merge_file

    spec, presets = _weights_spec(weights, preset_file)
    report = merge_file(src, dst, spec, keywords=list(keywords) or None, note=note, presets=presets)
    click.echo(
        f"{dst}: {report['modules_out']} of {report['modules_in']} modules kept "
        f"({report['modules_dropped']} at weight 0 dropped, {len(report['blockless'])} block-less at ×1)"
    )


@click.command("compress")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sv-ratio", "--param", "param", type=float, default=16.0, show_default=True,
              help="Parameter of the method (the sv_ratio by default).")
@click.option("--method", type=click.Choice(["sv_ratio", "sv_fro", "sv_cumulative", "rank"]), default="sv_ratio", show_default=True)
@click.option("--new-rank", type=int, default=128, show_default=True, help="Rank cap (the rank itself with --method rank).")
@click.option("--new-conv-rank", type=int, default=None, help="Rank cap for conv modules (default: --new-rank).")
@click.option("--save-precision", type=click.Choice(["fp16", "bf16", "float"]), default="fp16", show_default=True)
@click.option("--rank-rule", type=click.Choice(["legacy", "current"]), default="legacy", show_default=True,
              help="legacy: resize_lora.py's rule (threshold count + 1); current: the count without the +1.")
@click.option("--verbose", is_flag=True, help="Print per-module retention.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Modules resized side by side (default: one per CPU core, as torch counts them).")
@_user_errors
def compress_cmd(src: Path, dst: Path, param: float, method: str, new_rank: int, new_conv_rank: int | None,
                 save_precision: str, rank_rule: str, verbose: bool, progress: bool, threads: int | None) -> None:  # fmt: skip
    """Reduce ranks like sd-scripts resize_lora.py (default: sv_ratio 16, cap 128, fp16)."""
    from charbuild.lora.compress import compress_file

    report = compress_file(
        src, dst, method=method, param=param, new_rank=new_rank, new_conv_rank=new_conv_rank,
        save_precision=save_precision, progress=progress, verbose=verbose, rank_rule=rank_rule, workers=threads,
    )  # fmt: skip
    click.echo(
        f"{dst}: {report['size_in'] / 1e6:.1f} MB -> {report['size_out'] / 1e6:.1f} MB, "
        f"mean retained sum(S) {report['mean_sum_retained']:.1%}, Frobenius {report['mean_fro_retained']:.1%}"
    )


def _parse_input(text: str) -> tuple[str, float]:
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


@click.command("combine")
@click.argument("items", nargs=-1, required=True)
@click.option("--rank", type=int, default=None, help="Re-factorise the summed deltas to this rank (default: exact).")
@click.option("--weights", "-w", "weights", multiple=True,
              help="Block weights of one input (as merge --weights; - for none): give it once per input, in order.")
@click.option("--preset-file", type=click.Path(dir_okay=False, path_type=Path), help="LBW preset file (NAME:v1,…) adding presets.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Modules combined side by side (default: one per CPU core, as torch counts them).")
@_user_errors
def combine_cmd(items: tuple[str, ...], rank: int | None, weights: tuple[str, ...], preset_file: Path | None,
                progress: bool, threads: int | None) -> None:  # fmt: skip
    """Combine LoRAs: IN[:RATIO] ... OUT (exact rank concatenation, or --rank N by SVD)."""
    from charbuild.lora.combine import combine_files

    if len(items) < 2:
        raise click.UsageError("give at least one input and the output: A.safetensors[:RATIO] ... OUT.safetensors")
    *inputs, dst = items
    specs, presets = None, {}
    if weights:
        if len(weights) != len(inputs):
            raise click.UsageError(f"--weights given {len(weights)} times for {len(inputs)} inputs: give it once per input")
        specs = []
        for text in weights:
            if text.strip() == "-":
                specs.append(None)
                continue
            spec, more = _weights_spec(text, preset_file)
            specs.append(spec)
            presets.update(more)
    report = combine_files([_parse_input(x) for x in inputs], dst, rank=rank, progress=progress, workers=threads,
                           block_weights=specs, presets=presets or None)  # fmt: skip
    click.echo(f"{dst}: {report['modules']} modules, ranks {report['ranks']} ({report['mode']})")


COMMANDS = [inspect_cmd, merge_cmd, compress_cmd, combine_cmd]


@click.group("lora")
def lora_group() -> None:
    """LoRA file tools (standalone group for ``python -m charbuild.lora.cli``)."""


for _c in COMMANDS:
    lora_group.add_command(_c)

if __name__ == "__main__":  # pragma: no cover
    lora_group()
