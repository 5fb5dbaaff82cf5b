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
from importlib import resources
from pathlib import Path

from charbuild.errors import CharbuildError, doit_action
from charbuild.fsutil import write_bytes_atomic, write_text_atomic
from charbuild.layout import METRICS_NAME, REPORT as REPORT_DIR

from .explore_view import collect_explore, explore_files
from .flatten_view import collect_flattened, flatten_files
from .metrics import read_metrics
from .samples import sample_files

THUMB_PX = 96
ASSETS = ("report.css", "report.js")


def asset_name(rel: str, suffix: str = ".png") -> str:
    """The file name under ``files/`` of the copy or thumbnail of project file ``rel``."""
    return hashlib.sha1(rel.encode("utf-8")).hexdigest()[:16] + suffix




def observed_files(plan: dict, root: Path) -> dict[str, list[int]]:
    """(size, mtime_ns) of every preview sheet, LoRA file, loss log and sample the page would show now."""
    seen: dict[str, list[int]] = {}
    rels = flatten_files(plan)  # the cut-out view: masks, verdicts, prepared pictures
    for lora in plan["loras"]:
        rels.append(lora["preview"])
        for v in lora["variants"]:
            rels += [*v["files"].values(), f"{v['dir']}/{METRICS_NAME}"]
            rels += [p for codes in sample_files(root, v["dir"]).values() for p in codes.values()]
            rels += explore_files(root, v.get("explore"))
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
            "hashes": {k: meta[k] for k in _meaningful_hashes(info["file_size"]) if k in meta}}


def _meaningful_hashes(file_size: int) -> tuple[str, ...]:
    """The sshs hashes worth showing: sd-scripts' legacy hash reads the file from 1 MiB on, so a
    smaller file's is the hash of nothing (``e3b0c442``, the same for every small LoRA)."""
    from charbuild.lora.io import LEGACY_HASH_OFFSET

    return ("sshs_model_hash", "sshs_legacy_hash") if file_size > LEGACY_HASH_OFFSET else ("sshs_model_hash",)


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
            vd["explore_view"] = collect_explore(v.get("explore"), root, files.put, asset_name)
            entry["variants"].append(vd)
        loras.append(entry)
    # the cut-out view of each part (new dicts: the plan is also the page's uptodate value)
    characters = [{**ch, "parts": [{**part, "flattened_view": collect_flattened(part, root, files.put, _thumbnail,
                                                                                asset_name, THUMB_PX)}
                                   for part in ch["parts"]]} for ch in plan["characters"]]
    files.prune()
    return {"project": plan["project"], "characters": characters, "thumbs": thumbs,
            "loras": loras, "stale": stale}


def _stale_now(root: Path, run_started_ns: int, stale_check) -> list[tuple[str, str]]:
    """``charbuild status``'s list, less the tasks this doit run has already rebuilt.

    doit saves its state only when a run ends, so a task that ran earlier in this run still
    looks stale in the saved state; it rewrote all its targets since the run started, though.
    ``stale_check(root)`` is the status check the report's task was made with.
    """

    def rebuilt(targets) -> bool:
        if not targets:
            return False
        try:
            return all((root / p).stat().st_mtime_ns >= run_started_ns for p in targets)
        except OSError:
            return False

    return [(s.name, s.reason) for s in stale_check(root)
            if not s.name.startswith(("report", "_")) and not rebuilt(s.targets)]


def build_report(plan: dict, root: str | Path, *, run_started_ns: int, stale_check=None) -> str:
    """Write ``build/report/`` for ``plan``; return the observed key it was built from.

    ``stale_check(root)`` lists the project's stale tasks (:func:`charbuild.dodo.stale_tasks`);
    None leaves the state column empty.
    """
    from .render import render_page

    root = Path(root)
    key = observed_key(plan, root)  # before reading: a file changed meanwhile makes the next run rebuild
    out_dir = root / REPORT_DIR
    stale = _stale_now(root, run_started_ns, stale_check) if stale_check is not None else []
    page = collect(plan, root, out_dir, stale)
    for name in ASSETS:
        data = resources.files("charbuild.report").joinpath("assets", name).read_bytes()
        target = out_dir / name
        if not (target.is_file() and target.read_bytes() == data):
            write_bytes_atomic(target, data)
    write_text_atomic(out_dir / "index.html", render_page(page))
    return key


@doit_action
def build_report_action(plan: dict, root: str, run_started_ns: int, stale_check=None):
    """doit python-action: build the report; its return value is saved for :class:`ReportUpToDate`."""
    return {"observed_key": build_report(plan, root, run_started_ns=run_started_ns, stale_check=stale_check)}
