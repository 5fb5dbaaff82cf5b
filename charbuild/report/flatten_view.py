"""The report's source | mask | result view of the pictures cut out of their background.

Per part of a character, one row per picture with a mask (``charbuild/masks.py``): the
source, its mask (the cut-out's alpha, white = figure), and the largest prepared picture
(what trains); the pictures the method was unsure of are flagged with its reasons.
:func:`flatten_entries` (plan side, from the graph), :func:`flatten_files` (for the page's
uptodate digest), :func:`collect_flattened` (writes the thumbnails) and
:func:`render_flattened` (pure HTML).
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import quote


def flatten_entries(graph, part) -> list[dict]:
    """The plan's rows of ``part``: source, mask, verdict and result paths (project-relative)."""
    masks = graph.masks()
    largest: dict[str, str] = {}
    for img, _, png, _ in graph.part_files(part):  # smallest size first: the last one wins
        largest[img.rel] = png
    return [{"source": img.rel, "mask": masks[img.rel].png, "verdict": masks[img.rel].sidecar,
             "result": largest.get(img.rel)} for img in sorted(part.images, key=lambda i: i.rel) if img.rel in masks]


def flatten_files(plan: dict) -> list[str]:
    """The built files the view shows (their size and mtime go into the page's digest)."""
    return [rel for ch in plan["characters"] for part in ch["parts"] for row in part.get("flatten", [])
            for rel in (row["mask"], row["verdict"], row["result"]) if rel]


def _mask_thumbnail(path: Path, px: int) -> bytes:
    from charbuild.images import png_bytes, thumbnail

    alpha = thumbnail(path, px, "RGBA", "the report").getchannel("A")
    return png_bytes(alpha.convert("RGB"))


def collect_flattened(part: dict, root: Path, put, thumbnail, asset_name, px: int) -> list[dict]:
    """The page rows of one part: thumbnails written through ``put`` (None where not built yet)."""
    from charbuild.masks import read_verdict

    rows = []
    for row in part.get("flatten", []):
        mask, result = root / row["mask"], root / row["result"] if row["result"] else None
        rows.append({
            "source": row["source"],
            "mask_src": put(asset_name(row["mask"], ".mask.png"), _mask_thumbnail(mask, px)) if mask.is_file() else None,
            "result_src": put(asset_name(row["result"]), thumbnail(result)) if result and result.is_file() else None,
            "verdict": read_verdict(root / row["verdict"]),
        })
    return rows


def _verdict_text(verdict: dict | None) -> tuple[str, str]:
    """(css class, words) of a verdict."""
    if verdict is None:
        return "none", "not built yet"
    if verdict.get("method") == "alpha":
        return "none", "its own transparency"
    how = "flattened" if verdict.get("flattened") else "kept as it is"
    if verdict.get("sure", True):
        return "have", f"{how} ({verdict.get('method')})"
    return "warn", f"{how}; unsure: {'; '.join(verdict.get('reasons', []))}"


def render_flattened(rows: list[dict], thumbs: dict[str, str]) -> str:
    """The source | mask | result table of one part ("" when it has no masks)."""
    if not rows:
        return ""
    unsure = sum(1 for r in rows if r["verdict"] and not r["verdict"].get("sure", True))
    out = [f'<p class="{"warn" if unsure else "none"}">background: {len(rows)} opaque picture(s) cut out'
           + (f", {unsure} unsure" if unsure else "") + "</p>",
           '<table class="flatten"><tr><th>picture</th><th>source</th><th>mask</th><th>result</th><th>verdict</th></tr>']

    def img(src, alt):
        return f'<img src="{escape(quote(src), quote=True)}" alt="{escape(alt, quote=True)}">' if src else "—"

    for r in rows:
        css, words = _verdict_text(r["verdict"])
        flag = ' data-unsure="1"' if css == "warn" else ""
        out.append(f'<tr class="{css}"{flag}><td><code>{escape(r["source"])}</code></td>'
                   f'<td>{img(thumbs.get(r["source"]), "source")}</td><td>{img(r["mask_src"], "mask")}</td>'
                   f'<td>{img(r["result_src"], "result")}</td><td class="{css}">{escape(words)}</td></tr>')
    out.append("</table>")
    return "".join(out)
