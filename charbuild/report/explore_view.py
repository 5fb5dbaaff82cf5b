"""The report's block-weight exploration of a LoRA variant (:mod:`charbuild.explore`).

Per variant that was explored: the score table (identity, change against the base model, leak,
file size, the weights as a copy-ready string, the best row marked), a grid of rows (base model,
chosen weights, each candidate) × template codes (and the neutral prompt), and, when the
per-block analysis ran, a bar chart of the identity and leak change of each block switched off.
:func:`explore_files` (for the page's digest), :func:`collect_explore` (copies the pictures) and
:func:`render_explore` (pure HTML).
"""

from __future__ import annotations

from html import escape
from itertools import groupby
from pathlib import Path
from urllib.parse import quote

from charbuild import explore
from charbuild.fsutil import read_json
from charbuild.sample_prompts import NOTRIGGER_DIR

from .samples import sample_member, sample_name_key
from .svg import change_bar_svg


def explore_files(root: Path, entry: dict | None) -> list[str]:
    """The built files the view shows (project-relative): the scores, the analysis, every picture."""
    if not entry:
        return []
    rels = [entry["scores"], entry["blocks"]]
    folder = root / entry["dir"]
    if folder.is_dir():
        rels += sorted(p.relative_to(root).as_posix() for p in folder.rglob("*.png"))
    return rels


def collect_explore(entry: dict | None, root: Path, put, asset_name) -> dict | None:
    """The view's data: scores, analysis and the grid's pictures (copied by ``put``), or None."""
    if not entry:
        return None
    scores, blocks = read_json(root / entry["scores"]), read_json(root / entry["blocks"])
    if scores is None and blocks is None:
        return {"missing": True, "dir": entry["dir"]}
    grid: dict[str, dict[str, str]] = {}
    for row in (scores or {}).get("order", []):
        folder = root / entry["dir"] / row
        for png in sorted(folder.rglob("*.png")):  # the codes (a group's per member) and the neutral prompt
            name = png.relative_to(folder).with_suffix("").as_posix()
            if name.startswith(NOTRIGGER_DIR + "/"):
                continue
            rel = png.relative_to(root).as_posix()
            grid.setdefault(row, {})[name] = put(asset_name(rel), png.read_bytes())
    return {"scores": scores, "blocks": blocks, "grid": grid}


def _f(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _score_table(scores: dict, uid: str) -> str:
    rows, base = scores["rows"], scores["rows"].get(explore.BASE_ROW, {}).get("identity")
    out = ['<table class="explore"><tr><th>row</th><th>identity ↓</th><th>vs base</th><th>leak ↓</th><th>size</th>'
           "<th>weights</th></tr>"]
    for i, name in enumerate(scores["order"]):
        r = rows[name]
        ident = r.get("identity")
        change = f"{(ident - base) / base * 100:+.1f} %" if ident is not None and base else "—"
        size = f"{r['size'] / 1e6:.2f} MB" if r.get("size") else "—"
        weights = r.get("weights")
        spec = escape(r.get("spec") or "")
        cell = spec
        if weights:
            field = f"{uid}-w{i}"
            cell = (f'{spec}<br><input class="weights" id="{field}" readonly value="{escape(weights)}"> '
                    f'<button type="button" data-copy="{field}">copy</button>')
        best = name == scores.get("best")
        out.append(f'<tr{" class=best" if best else ""} data-row="{escape(name)}"><td>{escape(name)}'
                   f'{" ★" if best else ""}</td><td>{_f(ident)}</td><td>{change}</td><td>{_f(r.get("leak"))}</td>'
                   f"<td>{size}</td><td>{cell}</td></tr>")
    out.append("</table>")
    why = escape(scores.get("why", ""))
    out.append(f'<p>best: <b>{escape(scores.get("best") or "none")}</b> — {why}. Identity: the mean distance of the '
               "samples to the character's own pictures, code by code (lower: closer); leak: how far the same prompts "
               "without the trigger words, and an empty prompt, move from the base model's (lower: the rest of the "
               "prompt keeps its meaning).</p>")
    return "".join(out)


def _grid(grid: dict[str, dict[str, str]], order: list[str]) -> str:
    names = sorted({n for row in grid.values() for n in row}, key=sample_name_key)
    head = "".join(f'<th title="{escape(n)}">{escape(n.rpartition("/")[2])}</th>' for n in names)
    members = [(m, len(list(g))) for m, g in groupby(names, key=sample_member)]
    over = ""
    if any(m for m, _ in members):  # a group LoRA: its members over their columns
        over = "<tr><th></th>" + "".join(f'<th colspan="{n}">{escape(m or "")}</th>' for m, n in members) + "</tr>"
    rows = []
    for row in order:
        pictures = grid.get(row, {})
        cells = "".join(f'<td><img src="{quote(pictures[n], safe="/")}" alt="{escape(row)} {escape(n)}"></td>'
                        if n in pictures else '<td class="none">—</td>' for n in names)
        rows.append(f"<tr><th>{escape(row)}</th>{cells}</tr>")
    return f'<table class="samples explore-grid">{over}<tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _blocks(analysis: dict) -> str:
    effects = analysis.get("effects", {})
    order = [b for b in analysis.get("order", []) if b in effects]
    if not order:
        return '<p class="none">no block to switch off (every block is 0 or has no module)</p>'
    skipped = ", ".join(f"{b} ({why})" for b, why in analysis.get("skipped", {}).items())
    return ("<p>Each block switched off in turn from the chosen weights (the raw LoRA, not compressed): how much "
            "farther the samples get from the character (identity, up: the block carries the character) and how the "
            "leak changes (down: the block leaks). LBW's Effective Block Analyzer reports how many pixels change; "
            "this says whether the change is the character or the rest of the picture.</p>"
            + change_bar_svg([(b, effects[b]["identity"]) for b in order],
                             title="identity distance change without the block (up: the block carries the character)")
            + change_bar_svg([(b, effects[b]["leak"]) for b in order],
                             title="leak change without the block (down: the block leaks)")
            + (f'<p class="none">not switched off: {escape(skipped)}</p>' if skipped else ""))


def render_explore(view: dict | None, uid: str) -> str:
    """The exploration's HTML of one variant ('' when it has none)."""
    if not view:
        return ""
    out = ["<h4>block weights explored</h4>"]
    if view.get("missing"):
        return out[0] + f'<p class="none">not explored yet: <code>doit explore</code> writes {escape(view["dir"])}/</p>'
    if view.get("scores"):
        out += [_score_table(view["scores"], uid), _grid(view["grid"], view["scores"]["order"])]
    if view.get("blocks"):
        out += ["<h4>where the character lives (per block)</h4>", _blocks(view["blocks"])]
    return "".join(out)
