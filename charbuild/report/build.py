"""The report's doit action: gather what the plan points at, render the page, write it atomically.

Everything lands in ``build/report/``: ``index.html``, ``report.css``, ``report.js`` and
``files/`` (thumbnails of the source pictures, copies of the preview sheets and samples, named
by a hash of their source path so that any file name — Japanese included — is a safe URL). A
file the new page no longer uses is removed; nothing outside ``build/report/`` is touched.

The *observed key* is what decides whether the page is up to date beyond its ``file_dep`` (the
source pictures): the plan, plus (size, mtime) of every preview sheet, LoRA file, loss log and
sample it would show. The action computes it before it reads anything and returns it;
:class:`ReportUpToDate` compares it with the key of the files on disk now. Those build outputs
are keyed by stat rather than listed as ``file_dep`` so that ``doit --single report`` (what
``charbuild report`` runs) can write the page of a half-built project without training.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

from charbuild.errors import CharbuildError, doit_action
from charbuild.fsutil import write_bytes_atomic, write_text_atomic
from charbuild.layout import METRICS_NAME, REPORT as REPORT_DIR

from .flatten_view import collect_flattened, flatten_files
from .metrics import read_metrics

THUMB_PX = 96
ASSETS = ("report.css", "report.js")


def asset_name(rel: str, suffix: str = ".png") -> str:
    """The file name under ``files/`` of the copy or thumbnail of project file ``rel``."""
    return hashlib.sha1(rel.encode("utf-8")).hexdigest()[:16] + suffix


_USER_SAMPLE = re.compile(r"^p[1-9][0-9]*$")


def sample_name_key(name: str) -> tuple:
    """Column order of the samples grid: the angle codes, then the user's prompts ``p1, p2, …``."""
    return (1, int(name[1:]), "") if _USER_SAMPLE.match(name) else (0, 0, name)


def sample_files(root: Path, variant_dir: str) -> dict[int, dict[str, str]]:
    """``samples/<step>/<name>.png`` of a variant (``name``: an angle code, or ``p1``, ``p2``, … for
    the user's ``sample_prompts``): step -> name -> project-relative path."""
    from charbuild.codes import parse_code

    out: dict[int, dict[str, str]] = {}
    base = root / variant_dir / "samples"
    if not base.is_dir():
        return out
    for step_dir in base.iterdir():
        if not (step_dir.is_dir() and step_dir.name.isdigit()):
            continue
        for f in step_dir.iterdir():
            code = parse_code(f.name)
            name = code if code and f.stem.lower() == code else f.stem if _USER_SAMPLE.match(f.stem) else None
            if f.suffix.lower() == ".png" and name and f.is_file():
                out.setdefault(int(step_dir.name), {})[name] = f"{variant_dir}/samples/{step_dir.name}/{f.name}"
    return {s: dict(sorted(out[s].items(), key=lambda kv: sample_name_key(kv[0]))) for s in sorted(out)}


def observed_files(plan: dict, root: Path) -> dict[str, list[int]]:
    """(size, mtime_ns) of every preview sheet, LoRA file, loss log and sample the page would show now."""
    seen: dict[str, list[int]] = {}
    rels = flatten_files(plan)  # the cut-out view: masks, verdicts, prepared pictures
    for lora in plan["loras"]:
        rels.append(lora["preview"])
        for v in lora["variants"]:
            rels += [*v["files"].values(), f"{v['dir']}/{METRICS_NAME}"]
            rels += [p for codes in sample_files(root, v["dir"]).values() for p in codes.values()]
    for rel in rels:
        try:
            st = (root / rel).stat()
        except OSError:
            continue
        seen[rel] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(seen.items()))


def observed_key(plan: dict, root: Path) -> str:
    """A digest of the plan and the observed files: equal keys, equal page."""
    data = json.dumps({"plan": plan, "files": observed_files(plan, root)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


class ReportUpToDate:
    """doit ``uptodate`` of the report: the observed key equals the one saved by the last build."""

    def __init__(self, plan: dict, root: str):
        self.plan = plan
        self.root = root
        self.reason: str | None = None

    def __call__(self, task, values) -> bool:
        saved = values.get("observed_key")
        ok = saved == observed_key(self.plan, Path(self.root))
        self.reason = None if ok else ("never built" if saved is None else "shown files or settings changed")
        return ok

    def __repr__(self) -> str:
        return f"report: {self.reason or 'shown files and settings unchanged'}"


def _thumbnail(src: Path) -> bytes:
    from charbuild.images import png_bytes, thumbnail

    return png_bytes(thumbnail(src, THUMB_PX, "RGBA", "the report"))


def _inspect(path: Path) -> dict:
    from charbuild.lora.inspect import inspect_lora

    try:
        info = inspect_lora(path)
    except CharbuildError as exc:
        return {"error": exc.message}
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}
    meta = info["metadata"]
    return {"size": info["file_size"], "ranks": info["ranks"], "modules": info["modules"], "arch": info["arch"],
            "format": info["format"], "trigger_words": info["trigger_words"],
            "hashes": {k: meta[k] for k in ("sshs_model_hash", "sshs_legacy_hash") if k in meta}}


class _Files:
    """The files of the page under ``files/``: written once each, the rest removed at the end."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "files"
        self.written: set[str] = set()

    def put(self, name: str, data: bytes) -> str:
        target = self.dir / name
        if name not in self.written and not (target.is_file() and target.read_bytes() == data):
            write_bytes_atomic(target, data)
        self.written.add(name)
        return f"files/{name}"

    def prune(self) -> None:
        if self.dir.is_dir():
            for f in self.dir.iterdir():
                if f.is_file() and f.name not in self.written:
                    f.unlink()


def collect(plan: dict, root: Path, out_dir: Path, stale: list[tuple[str, str]]) -> dict:
    """Write the page's files under ``out_dir/files`` and return the page data for :mod:`.render`."""
    files = _Files(out_dir)
    thumbs: dict[str, str] = {}
    for ch in plan["characters"]:
        for part in ch["parts"]:
            for row in part["rows"]:
                for cell in row:
                    for rel in cell["pictures"]:
                        thumbs[rel] = files.put(asset_name(rel), _thumbnail(root / rel))
    loras = []
    for lora in plan["loras"]:
        preview = root / lora["preview"]
        entry = {**lora, "preview_src": files.put(asset_name(lora["preview"]), preview.read_bytes())
                 if preview.is_file() else None, "variants": []}
        for v in lora["variants"]:
            vd = {**v, "found": {}, "samples": {}, "metrics": None, "metrics_error": None}
            for role, rel in v["files"].items():
                if (root / rel).is_file():
                    vd["found"][role] = _inspect(root / rel)
            log_rel = f"{v['dir']}/{METRICS_NAME}"
            try:
                vd["metrics"] = read_metrics(root / log_rel)
            except CharbuildError as exc:  # shown on the page, with the project-relative path
                vd["metrics_error"] = str(CharbuildError(exc.message, log_rel, exc.line))
            for step, codes in sample_files(root, v["dir"]).items():
                vd["samples"][step] = {code: files.put(asset_name(rel), (root / rel).read_bytes())
                                       for code, rel in codes.items()}
            entry["variants"].append(vd)
        loras.append(entry)
    # the cut-out view of each part (new dicts: the plan is also the page's uptodate value)
    characters = [{**ch, "parts": [{**part, "flattened_view": collect_flattened(part, root, files.put, _thumbnail,
                                                                                asset_name, THUMB_PX)}
                                   for part in ch["parts"]]} for ch in plan["characters"]]
    files.prune()
    return {"project": plan["project"], "characters": characters, "thumbs": thumbs,
            "loras": loras, "stale": stale}


def _stale_now(root: Path, run_started_ns: int) -> list[tuple[str, str]]:
    """``charbuild status``'s list, less the tasks this doit run has already rebuilt.

    doit saves its state only when a run ends, so a task that ran earlier in this run still
    looks stale in the saved state; it rewrote all its targets since the run started, though.
    """
    from .source import stale_reasons, task_targets

    targets = task_targets(root)

    def rebuilt(name: str) -> bool:
        paths = targets.get(name)
        if not paths:
            return False
        try:
            return all((root / p).stat().st_mtime_ns >= run_started_ns for p in paths)
        except OSError:
            return False

    return [(n, r) for n, r in stale_reasons(root)
            if not n.startswith(("report", "_")) and not rebuilt(n)]


def build_report(plan: dict, root: str | Path, *, run_started_ns: int, with_status: bool = True) -> str:
    """Write ``build/report/`` for ``plan``; return the observed key it was built from."""
    from .render import render_page

    root = Path(root)
    key = observed_key(plan, root)  # before reading: a file changed meanwhile makes the next run rebuild
    out_dir = root / REPORT_DIR
    stale = _stale_now(root, run_started_ns) if with_status else []
    page = collect(plan, root, out_dir, stale)
    for name in ASSETS:
        data = resources.files("charbuild.report").joinpath("assets", name).read_bytes()
        target = out_dir / name
        if not (target.is_file() and target.read_bytes() == data):
            write_bytes_atomic(target, data)
    write_text_atomic(out_dir / "index.html", render_page(page))
    return key


@doit_action
def build_report_action(plan: dict, root: str, run_started_ns: int):
    """doit python-action: build the report; its return value is saved for :class:`ReportUpToDate`."""
    return {"observed_key": build_report(plan, root, run_started_ns=run_started_ns)}
