"""The report page as HTML text, from the data :func:`charbuild.report.build.collect` gathers (pure).

Every URL on the page is relative (``files/…``, ``report.css``): the folder opens from disk
with no server and no network. Text from the project (names, trigger words, reasons) is
escaped. The same data gives the same bytes.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from .explore_view import render_explore
from .flatten_view import render_flattened
from .overview import render_overview, sample_step_order
from .samples import sample_member, sample_name_key
from .svg import block_bar_svg, identity_chart_svg, loss_chart_svg

ROLES = (("raw", "raw (trained)"), ("merged", "merged (block weights)"), ("compressed", "compressed (the file to use)"))


def _e(value) -> str:
    return escape(str(value), quote=True)


def _src(path: str) -> str:
    return _e(quote(path))


def anchor(kind: str, name: str) -> str:
    """The ``id`` of a character's or a LoRA's section."""
    return f"{kind}-" + "".join(c if c.isalnum() else "_" for c in name)


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _number(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "—" if v is None else str(v)


def render_character(ch: dict, thumbs: dict[str, str]) -> str:
    """One character's section: the angle grid of each part, missing codes marked."""
    out = [f'<section class="character" id="{anchor("char", ch["name"])}" data-name="{_e(ch["name"])}">',
           f'<h2>character {_e(ch["name"])} <small>(keyword <code>{_e(ch["keyword"])}</code>, '
           f'{"symmetric" if ch["symmetric"] else "not symmetric: mirrored codes 5-7 expected"})</small></h2>']
    for part in ch["parts"]:
        title = "face" if part["kind"] == "face" else f'outfit {_e(part["name"])} (<code>{_e(part["keyword"])}</code>)'
        missing = part["missing"]
        out.append(f"<h3>{title}</h3>")
        out.append(f'<p class="{"warn" if missing else "none"}">'
                   + (f'{len(missing)} template code(s) missing: {_e(", ".join(missing))}' if missing
                      else "every template code has a picture") + "</p>")
        out.append(f'<table class="grid" data-columns="{part["columns"]}"><tr><th></th>'
                   + "".join(f"<th>h{h}</th>" for h in range(part["columns"])) + "</tr>")
        for v, row in enumerate(part["rows"]):
            out.append(f"<tr><th>v{v}</th>")
            for cell in row:
                if cell["pictures"]:
                    imgs = "".join(f'<img src="{_src(thumbs[p])}" alt="{_e(p)}" title="{_e(p)}">' for p in cell["pictures"])
                    out.append(f'<td class="have" data-code="{cell["code"]}"><span class="code">{cell["code"]}</span>{imgs}</td>')
                elif cell["template"]:
                    out.append(f'<td class="missing" data-code="{cell["code"]}"><span class="code">{cell["code"]}</span>missing</td>')
                else:
                    out.append(f'<td class="mirror" data-code="{cell["code"]}"><span class="code">{cell["code"]}</span>'
                               "not needed (symmetric)</td>")
            out.append("</tr>")
        out.append("</table>")
        out.append(render_flattened(part.get("flattened_view", []), thumbs))
    out.append("</section>")
    return "".join(out)


def _dataset_table(lora: dict) -> str:
    rows = "".join(
        f'<tr><td><code>{_e(r["folder"])}</code></td><td>{r["size"]}</td><td>{r["pictures"]}</td>'
        f'<td>{lora["repeats"]}</td><td>{_e("×".join(map(str, r["resolution"])) if r["resolution"] else "mixed sizes")}</td>'
        f'<td>{_number(r["batch"])}</td><td>{"yes" if r["flip_aug"] else "no"}</td></tr>'
        for r in lora["dataset"])
    if not rows:
        return '<p class="none">no prepared pictures: the dataset is empty</p>'
    total = sum(r["pictures"] for r in lora["dataset"])
    return ('<table class="dataset"><tr><th>folder</th><th>size</th><th>pictures</th><th>repeats</th>'
            f'<th>bucket resolution</th><th>batch</th><th>flip</th></tr>{rows}'
            f'<tr><th>total</th><td></td><td>{total}</td><td></td><td></td><td></td><td></td></tr></table>')


def _files_table(v: dict, lora: dict) -> str:
    rows = []
    for role, label in ROLES:
        rel = v["files"][role]
        info = v["found"].get(role)
        if info is None:
            rows.append(f'<tr><td>{label}</td><td><code>{_e(rel)}</code></td><td colspan="4" class="none">not built yet</td></tr>')
        elif "error" in info:
            rows.append(f'<tr><td>{label}</td><td><code>{_e(rel)}</code></td><td colspan="4" class="warn">'
                        f'cannot read it: {_e(info["error"])}</td></tr>')
        else:
            ranks = ", ".join(f"{r} ×{n}" for r, n in info["ranks"].items())
            hashes = "<br>".join(f"{_e(k)}: <code>{_e(h)}</code>" for k, h in info["hashes"].items()) or "—"
            rows.append(f'<tr><td>{label}</td><td><code>{_e(rel)}</code></td><td>{_size(info["size"])}</td>'
                        f'<td>{_e(ranks)}</td><td>{hashes}</td><td>{_e(", ".join(info["trigger_words"])) or "—"}</td></tr>')
    return ('<table class="files"><tr><th>file</th><th>path</th><th>size</th><th>ranks (modules)</th>'
            '<th>hashes</th><th>trigger words</th></tr>' + "".join(rows) + "</table>")


def _samples_grid(samples: dict) -> str:
    if not samples:
        return ('<p class="none">no samples yet: set <code>sample_every = N</code> in <code>[training]</code> '
                '(or the LoRA\'s <code>training</code> table), then <code>doit samples</code> renders them for a '
                'trained LoRA without training it again</p>')
    names = sorted({c for by_code in samples.values() for c in by_code}, key=sample_name_key)
    tables = {}  # a group LoRA's samples: one table per member, in name order
    for name in names:
        tables.setdefault(sample_member(name), []).append(name)
    out = []
    for member, columns in tables.items():
        head = "".join(f"<th>{_e(c.rpartition('/')[2])}</th>" for c in columns)
        rows = []
        for step in sample_step_order(samples):  # step 0 (the base model) and the last step first
            cells = "".join(f'<td><img src="{_src(samples[step][c])}" alt="step {step} {_e(c)}"></td>' if c in samples[step]
                            else '<td class="none">—</td>' for c in columns)
            label = f"step {step}" + (" <small>(base model)</small>" if int(step) == 0 else "")
            rows.append(f"<tr><th>{label}</th>{cells}</tr>")
        caption = f"<caption>{_e(member)}</caption>" if member else ""
        out.append(f'<table class="samples">{caption}<tr><th></th>{head}</tr>{"".join(rows)}</table>')
    return "".join(out)


def _compress_shown(settings: dict) -> dict:
    """The compression settings that apply: the method's own value, not the other methods'."""
    method = settings.get("method")
    return {k: v for k, v in settings.items() if v is not None and (not k.startswith("sv_") or k == method)}


def render_lora(lora: dict) -> str:
    """One LoRA's section: preview, dataset, per variant the loss, samples and files, the merge bar."""
    lid = anchor("lora", lora["name"])
    out = [f'<section class="lora" id="{lid}" data-name="{_e(lora["name"])}">',
           f'<h2>{_e(lora["kind"])} LoRA {_e(lora["name"])}</h2>',
           f'<p>trigger words: <code>{_e(", ".join(lora["keywords"]))}</code>; characters: '
           f'{_e(", ".join(lora["characters"]))}</p>', "<h3>preview sheet</h3>"]
    if lora["preview_src"]:
        out.append(f'<img class="preview" src="{_src(lora["preview_src"])}" alt="preview of {_e(lora["name"])}">')
    else:
        out.append('<p class="none">no preview sheet yet</p>')
    out += ["<h3>dataset</h3>", _dataset_table(lora)]
    merge = lora["merge"]
    out.append(f'<h3>merge weights: {_e(merge["preset"])} ({len(merge["blocks"])} blocks, {_e(merge["arch"])})</h3>')
    out.append(block_bar_svg([(b, w) for b, w in merge["blocks"]]))
    settings = ", ".join(f"{k} = {_number(v)}" for k, v in sorted(_compress_shown(lora["compress"]).items()))
    out.append(f"<p>compression: {_e(settings)}</p>")
    for i, v in enumerate(lora["variants"]):
        stem = v["files"]["compressed"].rsplit("/", 1)[-1].removesuffix(".safetensors")
        tag_id = f"{lid}-tag-{i}"
        params = ", ".join(f"{k} = {_number(p)}" for k, p in v["params"].items() if p is not None)
        out += [f'<div class="variant" data-variant="{_e(v["name"])}"><h3>variant {_e(v["name"])}</h3>',
                f"<p>{_e(params)}</p>",
                f'<p>use it: <input class="lora-tag" id="{tag_id}" readonly value="{_e(f"<lora:{stem}:1>")}"> '
                f'<button type="button" data-copy="{tag_id}">copy</button></p>',
                _files_table(v, lora), "<h4>loss</h4>"]
        if v["metrics_error"]:
            out.append(f'<p class="warn">{_e(v["metrics_error"])}</p>')
        elif v["metrics"] is None or v["metrics"].is_empty():
            out.append(f'<p class="none">no loss data yet: the trainer writes it to <code>{_e(v["dir"])}/metrics.jsonl</code></p>')
        else:
            if v["metrics"].loss or v["metrics"].val_loss:
                out.append(loss_chart_svg(v["metrics"], title=f'loss of {lora["name"]} {v["name"]}'))
            if v["metrics"].identity:
                out += ["<h4>identity</h4>", identity_chart_svg(v["metrics"])]
        out += ["<h4>samples</h4>", _samples_grid(v["samples"]), render_explore(v.get("explore_view"), f"{lid}-x{i}"),
                "</div>"]
    out.append("</section>")
    return "".join(out)


def render_stale(stale: list[tuple[str, str]]) -> str:
    """The "out of date" section: ``charbuild status``'s task names and reasons."""
    out = ['<section id="stale"><h2>out of date</h2>']
    if not stale:
        out.append('<p class="none">everything is up to date</p>')
    else:
        out.append(f"<p>{len(stale)} target(s) would be rebuilt by <code>doit</code> (as <code>charbuild status</code> "
                   "says):</p><table class=\"stale\"><tr><th>task</th><th>why</th></tr>")
        out += [f"<tr><td>{_e(n)}</td><td>{_e(r)}</td></tr>" for n, r in stale]
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def render_page(page: dict) -> str:
    """The whole ``index.html``."""
    nav = "".join(f'<a href="#{anchor("char", c["name"])}">{_e(c["name"])}</a>' for c in page["characters"])
    nav += " | " + "".join(f'<a href="#{anchor("lora", lo["name"])}">{_e(lo["name"])}</a>' for lo in page["loras"])
    # the answer first (every LoRA, its state, loss, identity and file), then the details
    body = [render_overview(page["loras"], page["stale"], anchor), render_stale(page["stale"])]
    body += [render_lora(lo) for lo in page["loras"]]
    body += [render_character(c, page["thumbs"]) for c in page["characters"]]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>charbuild report: {_e(page['project'])}</title>"
            '<link rel="stylesheet" href="report.css"><script src="report.js" defer></script></head><body>'
            f"<header><h1>charbuild report: {_e(page['project'])}</h1>"
            f"<p>{len(page['characters'])} character(s), {len(page['loras'])} LoRA(s)</p></header>"
            f'<nav><a href="#overview">LoRAs</a> | <a href="#stale">out of date</a> | {nav}</nav>'
            + "".join(body) + "</body></html>\n")
