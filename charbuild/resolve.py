"""The loader's second pass: what follows from each LoRA's settings, resolved once onto the Lora.

:func:`resolve_loras` turns a LoRA's variants into ``TrainParams``, its merge spec into block
weights and its ``continue_from`` into a file (and the training that makes it), reporting each
problem at the line of the setting that causes it. The graph, the report and the backends read
the results (``Lora.variant_params``, ``merge_weights``, ``continue_path``/``continue_task``) and
never resolve them again. Called by :func:`charbuild.config.load_project`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from . import layout
from .block_weights import merge_spec, resolve_merge_weights
from .checks import closest, show_path
from .dataset_toml import MixedSizeClassError, folder_class
from .errors import Problem
from .fsutil import under_root
from .model import Lora
from .prepared import subset_for
from .train.variants import training_defaults, variant_entries

#: the size SDXL trains at (1024-class): SDXL pictures or a ladder below it waste the model (a warning)
SDXL_NATIVE = 1024


@contextlib.contextmanager
def lbw_notes(report):
    """Hand each :class:`~charbuild.lora.blocks.SdxlListWarning` raised inside to ``report`` (once each)."""
    from .lora.blocks import SdxlListWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SdxlListWarning)
        yield
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, SdxlListWarning)):
        report(message)



def resolve_loras(root: Path, settings, characters: dict, loras: dict[str, Lora], problems: list[Problem]) -> None:
    """Resolve what follows from each LoRA's settings onto the Lora (variants, merge weights,
    continue_from) and check what needs the whole project (size classes); problems are appended.

    ``settings`` holds project.toml's validated tables (``config.ProjectSettings``).
    """

    variant_names: dict[str, list[str]] = {}
    if settings.readable:  # else every LoRA would be blamed for what project.toml may have said
        for lora in loras.values():
            variant_names[lora.name] = _resolve_variants(lora, settings, problems)
            _resolve_merge(lora, settings, problems)
            _resolve_explore(lora, settings, problems)
        _resolve_continue_from(root, loras, variant_names, problems)
    # every prepared folder's images must share one size class (the original's rule)
    for ch in characters.values():
        for part in [ch.face, *ch.outfits.values()]:
            largest = 0
            for size in settings.dataset["sizes"]:
                subset = subset_for(part, size)
                if subset is None:
                    continue
                largest = size
                try:
                    folder_class(subset, settings.model["arch"])
                except MixedSizeClassError as exc:
                    problems.append(Problem(show_path(root, ch.dir / ("face" if part.kind == "face" else f"outfits/{part.name}")),
                                            f"{exc}; crop the pictures to similar proportions"))
            if settings.model["arch"] == "sdxl" and 0 < largest < SDXL_NATIVE <= max(settings.dataset["sizes"]):
                folder = ch.dir / ("face" if part.kind == "face" else f"outfits/{part.name}")
                problems.append(Problem(show_path(root, folder), f"the base model is SDXL, which trains at {SDXL_NATIVE} px, "
                                        f"but these pictures are prepared at {largest} px at most (none is {SDXL_NATIVE} px "
                                        f"or larger, and pictures are never upscaled): use larger pictures", None, "warning"))


def _resolve_variants(lora: Lora, settings, problems: list[Problem]) -> list[str]:
    """Resolve ``lora``'s variants into ``lora.variant_params``; report each failure at the line of
    the list it comes from (once: a bad entry of the project's list is not repeated for every
    LoRA). Returns its variant names."""
    from .train.variants import resolve_variant

    defaults = training_defaults(settings.training)
    if lora.variants:
        where = (lora.source, lora.origin.line("variants") if lora.origin else lora.line)
    else:
        where = (settings.origin.file, settings.origin.line("training", "variants"))
    resolved = []
    for entry in variant_entries(lora, settings.training):
        try:
            params = resolve_variant(entry, defaults=defaults, overrides=lora.training, steps=lora.steps)
        except (ValueError, TypeError) as exc:
            _add_once(problems, Problem(where[0], f"LoRA {lora.name!r}: {exc}", where[1]))
            continue
        if params.name in {p.name for p in resolved}:
            problems.append(Problem(where[0], f"LoRA {lora.name!r}: variant {params.name!r} listed twice; give one a \"name\"", where[1]))
            continue
        resolved.append(params)
    lora.variant_params = tuple(resolved)
    return [p.name for p in resolved]


def _add_once(problems: list[Problem], problem: Problem) -> None:
    """Add ``problem`` unless the same complaint (whatever LoRA it names) is already there."""
    same = problem.message.split(": ", 1)[-1]
    for p in problems:
        if p.path == problem.path and p.line == problem.line and p.message.split(": ", 1)[-1] == same:
            return
    problems.append(problem)


def _resolve_merge(lora: Lora, settings, problems: list[Problem]) -> None:
    """Resolve ``lora``'s block weights into ``lora.merge_weights``: its own ``merge``, else its
    kind's project default. An error of its own ``merge`` is reported at that key's line (the
    project's kind defaults and presets were checked at their own lines when project.toml was read)."""
    spec = merge_spec(lora, settings.merge)
    if isinstance(spec, str) and spec.strip() in settings.broken_presets:
        return
    line = lora.origin.line("merge") if lora.origin else lora.line
    own_notes = (lambda note: problems.append(Problem(lora.source, f"LoRA {lora.name!r} merge weights: {note}", line,
                                                      "warning"))) if lora.merge is not None else (lambda note: None)
    try:
        with lbw_notes(own_notes):  # the project's defaults said theirs when project.toml was read
            lora.merge_weights = resolve_merge_weights(spec, {"merge": settings.merge, "model": settings.model})
    except ValueError as exc:
        if lora.merge is not None:
            problems.append(Problem(lora.source, f"LoRA {lora.name!r} merge weights: {exc}", line))
        return
    lora.merge_label = spec.strip() if isinstance(spec, str) else "custom block weights"


def _resolve_explore(lora: Lora, settings, problems: list[Problem]) -> None:
    """``lora.explore_candidates`` from its own ``explore``, else the project's ``[merge] explore``
    (whose problems were reported at its own line when project.toml was read)."""
    from .explore import resolve_candidates

    own = lora.explore is not None
    entries = lora.explore if own else settings.merge.get("explore", [])
    line = lora.origin.line("explore") if lora.origin and own else lora.line
    note = (lambda text: problems.append(Problem(lora.source, f"LoRA {lora.name!r} explore: {text}", line, "warning"))
            ) if own else (lambda text: None)
    with lbw_notes(note):
        candidates, messages = resolve_candidates(entries, {"merge": settings.merge, "model": settings.model})
    if own:
        problems.extend(Problem(lora.source, f"LoRA {lora.name!r} {m}", line) for m in messages)
    lora.explore_candidates = tuple(candidates)


def _resolve_continue_from(root: Path, loras: dict[str, Lora], variant_names: dict[str, list[str]],
                         problems: list[Problem]) -> None:
    """``continue_from``: an existing .safetensors file, or ``<lora>/<variant>`` of this project
    (no LoRA may, through such references, continue from itself). Sets each LoRA's
    ``continue_path`` (absolute) and, for a variant of this project, ``continue_task``."""
    targets: dict[str, str] = {}  # lora -> the lora it continues from
    for lora in loras.values():
        value = lora.continue_from
        if value is None:
            continue
        line = lora.origin.line("continue_from") if lora.origin else lora.line
        if value.strip().lower().endswith(".safetensors"):
            path = under_root(root, value.strip())
            if not path.is_file():
                problems.append(Problem(lora.source, f"'continue_from' file {value!r} does not exist; give a .safetensors "
                                        f"LoRA relative to {root.name}/ or an absolute path, or \"<lora>/<variant>\"", line))
            lora.continue_path = str(path)
            continue
        name, sep, variant = value.replace("\\", "/").partition("/")
        if not sep or name not in loras:
            close = closest(name, loras)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(Problem(lora.source, f"'continue_from' = {value!r} names no LoRA of this project{hint}; write "
                                    "\"<lora>/<variant>\" or the path of a .safetensors file", line))
            continue
        known = variant_names.get(name, [])
        if variant not in known:
            close = closest(variant, known)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; its variants: {', '.join(known) or 'none'}"
            problems.append(Problem(lora.source, f"'continue_from' = {value!r}: LoRA {name!r} has no variant {variant!r}{hint}", line))
            continue
        targets[lora.name] = name
        lora.continue_path = str(root / layout.raw_lora(name, variant))
        lora.continue_task = f"train:{name}/{variant}"
    for start in targets:
        seen = [start]
        while seen[-1] in targets:
            nxt = targets[seen[-1]]
            if nxt in seen:
                if nxt == start:
                    lora = loras[start]
                    chain = " -> ".join(seen + [nxt])
                    problems.append(Problem(lora.source, f"'continue_from' makes LoRA {start!r} continue from itself "
                                            f"({chain}); continue from another LoRA or a file",
                                            lora.origin.line("continue_from") if lora.origin else lora.line))
                break
            seen.append(nxt)
