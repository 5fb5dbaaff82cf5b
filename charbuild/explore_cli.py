"""``charbuild explore LORA``: build a LoRA's exploration (what is stale of it) and print its tables."""

from __future__ import annotations

from pathlib import Path

import click

from . import explore, layout
from .errors import CharbuildError
from .fsutil import read_json


def explore_command(root: Path, name: str, *, blocks: bool = False, build: bool = True) -> int:
    """Build (unless ``build`` is False) and print the exploration of LoRA ``name``; the exit status."""
    from .checks import closest
    from .dodo import forget_loaded_projects, project_graph, run_doit

    forget_loaded_projects()  # read the project as it is now
    g = project_graph(root)
    lora = g.project.loras.get(name)
    if lora is None:
        close = closest(name, g.project.loras)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CharbuildError(f"no LoRA named {name!r}{hint}; known: {', '.join(g.project.loras)}")
    if not lora.explore_candidates and not blocks:
        raise CharbuildError(f"LoRA {name!r} has no candidate block weights to explore: add e.g. "
                             f"explore = [\"ALL\", \"BODY\", \"0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1\"] to [merge] in "
                             f"characters/project.toml (every LoRA) or to the LoRA's own table; or give --blocks",
                             path=lora.source, line=lora.line)
    variants = [p.name for p in g.variants(lora)]
    code = 0
    if build:
        targets = [f"explore:{name}/{v}" for v in variants if lora.explore_candidates]
        targets += [f"blocks:{name}/{v}" for v in variants if blocks]
        code = run_doit(root, ["run", "--continue", *targets], analyse=frozenset([name]) if blocks else frozenset())
    for variant in variants:
        _print_variant(root, name, variant, lora.explore_candidates, blocks)
    click.echo("the pictures: `charbuild report` (the LoRA's section of build/report/index.html)")
    return code


def _print_variant(root: Path, name: str, variant: str, candidates, blocks: bool) -> None:
    click.echo(f"{name}/{variant}")
    if candidates:
        scores = read_json(root / layout.explore_scores(name, variant))
        if scores is None:
            click.echo(f"  not explored yet: charbuild explore {name}")
        else:
            click.echo("  identity: mean distance of the samples to the character's pictures (lower: closer); "
                       "leak: how far prompts without the trigger move (lower: better)")
            for line in explore.table_lines(scores):
                click.echo(line)
    if blocks:
        analysis = read_json(root / layout.blocks_scores(name, variant))
        if analysis is None:
            click.echo(f"  no per-block analysis yet: charbuild explore {name} --blocks")
        else:
            for line in explore.blocks_lines(analysis):
                click.echo(line)
