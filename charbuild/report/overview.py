"""The report's first screen: one row per LoRA variant that answers "is it good, and what do I use?" (pure).

Columns: the LoRA and variant (a link to its section), its state (up to date, not built, or
stale and why, from ``charbuild status``), the final training and validation loss, the
identity distance before → after (step 0, the base model, → the last sample step; per member
for a group LoRA; lower is closer to the character's own pictures, :mod:`charbuild.identity`),
the trigger score (the LoRA's effect on prompts without its trigger words; low is good), and
the file to use with its ``<lora:…:1>`` tag.
"""

from __future__ import annotations

from html import escape


def _e(value) -> str:
    return escape(str(value), quote=True)


def variant_state(lora: str, variant: dict, stale: list[tuple[str, str]]) -> tuple[str, str]:
    """(css class, text) of a variant's state: stale tasks of this LoRA/variant first, then "not built"."""
    key = f"{lora}/{variant['name']}"
    reasons = [f"{name.split(':', 1)[0]}: {why}" for name, why in stale
               if name.split(":", 1)[-1] in (key, lora)]
    if reasons:
        return "warn", "stale — " + "; ".join(reasons[:2]) + (" …" if len(reasons) > 2 else "")
    if "compressed" not in variant.get("found", {}):
        return "none", "not built yet"
    return "ok", "up to date"


def _last(points) -> str:
    return f"{points[-1][1]:.4f}" if points else "—"


def identity_cell(metrics) -> str:
    """``0.41 → 0.17 (−59 %)`` per member, or a dash."""
    if metrics is None or not metrics.identity:
        return "—"
    rows = []
    for member, points in metrics.identity.items():
        change = metrics.identity_change(member)
        label = f"<small>{_e(member)}</small> " if len(metrics.identity) > 1 else ""
        if change is None:
            rows.append(f"{label}{points[-1][1]:.3f}")
            continue
        before, after = change
        drop = (before - after) / before * 100 if before else 0.0
        css = "ok" if drop >= 30 else "warn" if drop <= 0 else ""
        rows.append(f'{label}{before:.3f} → {after:.3f} <span class="{css}">({-drop:+.0f} %)</span>')
    return "<br>".join(rows)


def explore_note(variant: dict) -> str:
    """A line under the file when the variant's block weights were explored: whether yours win."""
    scores = (variant.get("explore_view") or {}).get("scores")
    if not scores:
        return ""
    best, rows = scores.get("best"), scores["rows"]
    if best is None:
        text = "no row wins (see the LoRA's section)"
    elif best == "chosen":
        text = "your weights win"
    else:
        mine = rows.get("chosen", {}).get("identity")
        text = (f"{best} is closer ({rows[best]['identity']:.3f} against your "
                f"{'—' if mine is None else f'{mine:.3f}'})")
    return f"<br><small>block weights explored: {_e(text)}</small>"


def render_overview(loras: list[dict], stale: list[tuple[str, str]], anchor) -> str:
    """The overview table of every LoRA variant (``anchor(kind, name)``: the section ids)."""
    rows = []
    for lora in loras:
        for i, v in enumerate(lora["variants"]):
            css, state = variant_state(lora["name"], v, stale)
            m = v.get("metrics")
            stem = v["files"]["compressed"].rsplit("/", 1)[-1].removesuffix(".safetensors")
            tag_id = f'{anchor("lora", lora["name"])}-top-{i}'
            trigger = f"{m.trigger[-1][1]:.3f}" if m is not None and m.trigger else "—"
            rows.append(
                f'<tr><td><a href="#{anchor("lora", lora["name"])}">{_e(lora["name"])}</a><br>'
                f'<small>{_e(lora["kind"])}, {_e(v["name"])}</small></td>'
                f'<td class="{css}">{_e(state)}</td>'
                f'<td>{_last(m.loss) if m else "—"}</td><td>{_last(m.val_loss) if m else "—"}</td>'
                f"<td>{identity_cell(m)}</td><td>{trigger}</td>"
                f'<td><code>{_e(v["files"]["compressed"])}</code><br>'
                f'<input class="lora-tag" id="{tag_id}" readonly value="{_e(f"<lora:{stem}:1>")}"> '
                f'<button type="button" data-copy="{tag_id}">copy</button>{explore_note(v)}</td></tr>')
    if not rows:
        return '<section id="overview"><h2>LoRAs</h2><p class="none">no LoRA in this project</p></section>'
    return ('<section id="overview"><h2>LoRAs</h2>'
            '<table class="overview"><tr><th>LoRA</th><th>state</th><th>final loss</th><th>validation loss</th>'
            '<th title="distance of the samples to the character\'s own pictures, step 0 (base model) → last step; '
            'lower is closer">identity (step 0 → last)</th>'
            '<th title="effect on prompts without the trigger words; low is good">trigger leak</th>'
            '<th>file to use</th></tr>' + "".join(rows) + "</table>"
            '<p class="none">identity: distance of each sample to the training picture of its code (0 = the same '
            "figure colours and outline); step 0 is the base model without the LoRA.</p></section>")


def sample_step_order(steps) -> list:
    """Sample rows: step 0 and the last step first (the before/after), then the steps between."""
    ordered = sorted(steps, key=int)
    if len(ordered) <= 2:
        return ordered
    return [ordered[0], ordered[-1], *ordered[1:-1]]
