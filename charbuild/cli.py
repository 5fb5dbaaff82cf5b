"""The ``charbuild`` command: check, build, status, new, tags, train, explore, tensorboard, and the
LoRA tools (inspect, merge, compress, combine).

Every user-facing failure is a ``CharbuildError``; :func:`main` is the one place
that prints them (``path:line: error: message``) and picks the exit status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from .errors import CharbuildError

ROOT_HELP = "Project folder, the one holding characters/ (default: found from here upwards)."


def _root(root: str | None) -> Path:
    from .config import find_root

    return find_root(Path(root) if root else None)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="charbuild")
def cli():
    """Build Stable Diffusion character LoRAs from a folder of pictures, incrementally."""


@cli.command()
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
@click.option("--quick", is_flag=True, help="Read picture headers only (skip decoding every picture).")
def check(root, quick):
    """Validate the project; list every problem as path:line: message."""
    from .config import load_project
    from .masks import unsure_pictures

    project = load_project(_root(root), verify_images=not quick)
    # opaque pictures whose background the built-in method was unsure of (--quick: built ones only)
    project.warnings.extend(unsure_pictures(project, judge_missing=not quick))
    for w in project.warnings:
        click.echo(str(w), err=True)
    pictures = sum(len(p.images) for ch in project.characters.values() for p in [ch.face, *ch.outfits.values()])
    kinds = {}
    for lora in project.loras.values():
        kinds[lora.kind] = kinds.get(lora.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items())
    click.echo(f"ok: {len(project.characters)} character(s), {pictures} picture(s), "
               f"{len(project.loras)} LoRA(s) ({summary}), {len(project.warnings)} warning(s)")


JOBS_HELP = ("Tasks run in parallel (default: as many as trainings can run at once: the GPUs of [trainer] gpus, "
             "or [trainer] cpu_trainings without a GPU; trainings still take one slot each).")


def jobs_args(jobs: int | None) -> list[str]:
    """doit's arguments for ``-n/--jobs`` (none when not given: the project's default,
    :func:`charbuild.dodo.default_jobs`)."""
    if jobs is None:
        return []
    if jobs == 1:  # one task at a time, in this process (doit's -n 0), whatever the default
        return ["-n", "0"]
    return ["-n", str(jobs), "-P", "process"]


@cli.command()
@click.argument("targets", nargs=-1)
@click.option("-n", "--jobs", type=click.IntRange(min=1), default=None, help=JOBS_HELP)
@click.option("--for", "for_file", type=click.Path(exists=True, dir_okay=False), help="Build what depends on this file.")
@click.option("--train/--no-train", "with_training", default=False, help="With --for: also train, merge and compress.")
@click.option("--continue", "keep_going", is_flag=True, help="Go on past failed tasks; summary at the end.")
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
def build(targets, jobs, for_file, with_training, keep_going, root):
    """Build TARGETS (default: everything): task names, groups, characters or LoRA names."""
    from .dodo import run_doit

    root_path = _root(root)
    targets = list(targets)
    if for_file:
        targets += targets_for_file(root_path, Path(for_file), with_training)
        if not targets:
            click.echo(f"{for_file}: nothing in the project depends on this file")
            return
    argv = ["run"] + jobs_args(jobs)
    if keep_going:
        argv.append("--continue")
    code = run_doit(root_path, argv + targets)
    sys.exit(code)


def targets_for_file(root: Path, file: Path, with_training: bool = False) -> list[str]:
    """doit task names that depend on ``file`` (a source picture or a TOML of the project)."""
    from .dodo import project_graph

    g = project_graph(root)
    project = g.project
    file = file.resolve()
    names: list[str] = []
    loras = []
    for part in g.parts():
        for img in part.images:
            if img.path.resolve() == file:
                names += g.picture_task_names(part, img)
                loras += [lora for lora in project.loras.values() if part in lora.parts]
    chars_dir = project.characters_dir.resolve()
    if file.name == "character.toml" and file.parent.parent == chars_dir:
        ch = file.parent.name
        for part in g.parts():
            if part.character == ch:
                names += g.picture_task_names(part)
        loras += [lora for lora in project.loras.values() if ch in lora.characters]
    if file.parent == chars_dir and file.name in ("project.toml", "groups.toml"):
        names += ["image", "caption"]
        loras += list(project.loras.values())
    for lora in {lora.name: lora for lora in loras}.values():
        names += [f"dataset:{lora.name}", f"preview:{lora.name}"]
        if with_training:
            names += [f"compress:{lora.name}/{p.name}" for p in g.variants(lora)]
    return list(dict.fromkeys(names))


@cli.command()
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
@click.option("--all", "show_all", is_flag=True, help="List every stale task, not the first few per group.")
def status(root, show_all):
    """Targets out of date, and why."""
    from .dodo import project_graph
    from .status import stale_tasks

    root_path = _root(root)
    project_graph(root_path)  # a project with errors: its path:line lines, exit 2
    # private tasks (doit's "_" names: housekeeping such as _prune) are no target a user builds
    stale = [(name, reasons) for name, reasons in stale_tasks(root_path) if not name.startswith("_")]
    if not stale:
        click.echo("everything is up to date")
        return
    groups: dict[str, list] = {}
    for name, reasons in stale:
        groups.setdefault(name.split(":", 1)[0], []).append((name, reasons))
    for group, items in groups.items():
        click.echo(f"{group}: {len(items)} to build")
        for name, reasons in items if show_all else items[:5]:
            if reasons.startswith(f"{name}: "):  # a check that names its task ("report: …") says it once
                reasons = reasons[len(name) + 2:]
            click.echo(f"  {name}: {reasons}")
        if not show_all and len(items) > 5:
            click.echo(f"  ... and {len(items) - 5} more (--all lists them)")
    click.echo("(tasks downstream of these rebuild too when their inputs change)")


@cli.command()
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
@click.option("--build", "build_all", is_flag=True, help="Bring every LoRA up to date first (trains), as `doit report` does.")
def report(root, build_all):
    """Write the project report build/report/index.html (trains nothing unless --build)."""
    from .report.cli import report_command

    sys.exit(report_command(_root(root), build_all=build_all))


@cli.command()
@click.argument("name")
@click.option("--keyword", help="Trigger word (default: the name without spaces).")
@click.option("--outfit", "outfits", multiple=True, help="Add an outfit (repeatable).")
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
def new(name, keyword, outfits, root):
    """Scaffold characters/NAME with a commented character.toml."""
    root_path = Path(root) if root else Path.cwd()
    try:
        root_path = _root(root)
    except CharbuildError:
        pass
    folder = root_path / "characters" / name
    if (folder / "character.toml").exists():
        raise CharbuildError(f"{name!r} already exists; nothing was changed", path=folder / "character.toml")
    keyword = keyword or "".join(name.split())
    from .scaffold import character_toml, project_base

    text = character_toml(name, keyword, list(outfits), project_base(root_path))
    (folder / "face").mkdir(parents=True, exist_ok=True)
    for o in outfits:
        (folder / "outfits" / o).mkdir(parents=True, exist_ok=True)
    from .fsutil import write_text_atomic

    write_text_atomic(folder / "character.toml", text)
    click.echo(f"created {folder.relative_to(root_path).as_posix()}/character.toml; put pictures in face/"
               + (" and outfits/<outfit>/" if outfits else ""))


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--keyword", help="Keyword (default: from the folder name, as the original tool did).")
@click.option("--tag", "tags", multiple=True, help="Extra tag after the keyword (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace .txt files that differ from the generated caption.")
def tags(folder, keyword, tags, overwrite):
    """Caption every coded picture in FOLDER in place (the original drag-and-drop tool)."""
    from .captions import caption_folder

    report = caption_folder(Path(folder), keyword=keyword, tags=list(tags), overwrite=overwrite)
    for line in report.lines():
        click.echo(line)


@cli.command()
@click.argument("loras", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the training commands; run nothing.")
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
@click.option("-n", "--jobs", type=click.IntRange(min=1), default=None, help=JOBS_HELP)
@click.option("--force", is_flag=True, help="Train again even when up to date (and not from the run cache).")
def train(loras, dry_run, root, jobs, force):
    """Train LORAS (default: every stale one), or print the commands with --dry-run."""
    from .dodo import project_graph, run_doit

    root_path = _root(root)
    g = project_graph(root_path)
    unknown = [n for n in loras if n not in g.project.loras]
    if unknown:
        raise CharbuildError(f"no LoRA named {', '.join(unknown)}; known: {', '.join(g.project.loras)}")
    selected = [g.project.loras[n] for n in loras] if loras else list(g.project.loras.values())
    if dry_run:
        from .train.runner import dry_run_commands

        for lora in selected:
            for params in g.variants(lora):
                job = g.train_job(lora, params)
                click.echo(f"# train:{lora.name}/{params.name}")
                for line in dry_run_commands(job):
                    click.echo(line)
        return
    labels = [f"{lora.name}/{p.name}" for lora in selected for p in g.variants(lora)]
    argv = ["run", "--continue"] + jobs_args(jobs)
    from .report.summary import TrainSummaryReporter

    sys.exit(run_doit(root_path, argv + [f"train:{label}" for label in labels],
                      extra_config={"reporter": TrainSummaryReporter},
                      force_train=frozenset(labels) if force else frozenset()))


@cli.command()
@click.argument("lora")
@click.option("--blocks", is_flag=True, help="Also the per-block analysis: each block of the chosen weights off in turn.")
@click.option("--no-build", is_flag=True, help="Print what was built last; build nothing.")
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
def explore(lora, blocks, no_build, root):
    """Compare LORA's candidate block weights ([merge] explore): build what is stale, print the scores."""
    from .explore_cli import explore_command

    sys.exit(explore_command(_root(root), lora, blocks=blocks, build=not no_build))


@cli.command()
@click.option("--root", type=click.Path(file_okay=False), help=ROOT_HELP)
@click.option("--port", type=int, default=6006, show_default=True)
def tensorboard(root, port):
    """Show the training logs of every LoRA in TensorBoard."""
    root_path = _root(root)
    from .layout import Layout

    logdir = Layout(root_path).loras_dir
    click.echo(f"TensorBoard on http://localhost:{port} (logs: {logdir})")
    sys.exit(subprocess.call([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]))


def _register_lora_commands() -> None:
    from .lora.cli import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register_lora_commands()


def _say_stopped() -> None:
    from .buildlock import STOPPED

    click.echo(STOPPED, err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the one handler for every CharbuildError."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except CharbuildError as exc:
        for problem in exc.problems():
            click.echo(str(problem), err=True)
        for warning in getattr(exc, "warnings", []):
            click.echo(str(warning), err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _say_stopped()
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _say_stopped()
        sys.exit(130)


if __name__ == "__main__":
    main()
