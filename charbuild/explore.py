"""Block-weight exploration (pure): a LoRA's candidate weights, their names, scores and the best one.

``[merge] explore = ["FACE", "ALL", "0,1,1,…", "IN04:0.5,OUT03-OUT05:0", …]`` (project-wide, or a
LoRA's own ``explore``) lists block weights to compare with the LoRA's chosen ``merge`` weights.
Each *candidate* becomes a LoRA file of its own (merged with its weights and compressed as the
deliverable is) under ``<variant>/explore/<name>/``, and every candidate is rendered with the
same prompts and seeds (the LoRA's template-code prompts and the training samples' seeds) beside
two references: ``base`` (the base model alone) and ``chosen`` (the deliverable file).

Scores of a row (lower is better for both distances; :mod:`charbuild.identity` measures them):

* **identity**: the mean distance of its template-code samples to the character's own training
  picture of the same code (a group LoRA: the mean over its members);
* **leak**: how far the LoRA moves what the prompt does not ask for: the mean distance of its
  renders of the level-camera prompts *without the trigger words*, and of a neutral prompt (no
  words at all), to the base model's renders of them (0 for the base model itself). Blocks that carry background and pose
  raise it (the original framework's "avoid BACKGROUND and POSE");
* **size**: the candidate file's bytes after compression.

The best candidate (:func:`best_row`): the lowest identity distance among the rows that are closer
to the character than the base model and whose leak is at most ``explore_max_leak``, or, without
it, :data:`LEAK_SLACK` times the chosen weights' leak (a leak's scale depends on the model); ties go
to the smaller leak, then the smaller file. The chosen weights compete too: when they win, keep them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

#: Rows every exploration renders besides the candidates.
BASE_ROW = "base"
CHOSEN_ROW = "chosen"
#: The folder (under ``explore/``) of the per-block analysis.
BLOCKS_ROW = "blocks"
RESERVED_ROWS = {BASE_ROW, CHOSEN_ROW, BLOCKS_ROW}
#: Without ``[merge] explore_max_leak`` (an absolute bound), a best row may leak at most this times
#: the chosen weights' leak: what the leak means in numbers depends on the model, so the chosen
#: weights, which the user already accepts, set the scale.
LEAK_SLACK = 1.1
DEFAULT_MAX_LEAK = None
#: The neutral prompt: no words at all (what the model draws unasked; a LoRA that moves it leaks
#: into every prompt), rendered as ``neutral.png`` with the first template code's seed.
NEUTRAL_NAME = "neutral"
NEUTRAL_PROMPT = ""
#: The camera height (a code's 2nd character) whose codes the leak is measured on: level (0).
LEAK_CAMERA = "0"

_SAFE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")


@dataclass(frozen=True)
class Candidate:
    """One candidate of an exploration: ``name`` (its folder), ``spec`` (as written), ``weights``."""

    name: str
    spec: str
    weights: dict

    @property
    def empty(self) -> bool:
        """Every block weighed 0: the LoRA changes nothing, no file is made (the base model's samples)."""
        return not any(self.weights.values())


def spec_text(spec: Any) -> str:
    """A weight spec as one line of text (a list as LBW's comma string, a table as ``BLOCK:w`` entries)."""
    if isinstance(spec, str):
        return spec.strip()
    if isinstance(spec, Mapping):
        return ",".join(f"{k}:{v:g}" if isinstance(v, (int, float)) else f"{k}:{v}" for k, v in spec.items())
    return ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in spec)


def weights_digest(weights: Mapping[str, float]) -> str:
    """A short digest of resolved weights (stable across runs and platforms)."""
    text = json.dumps({k: float(v) for k, v in sorted(weights.items())}, sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def candidate_name(spec: Any, weights: Mapping[str, float]) -> str:
    """The folder name of a candidate: a preset name as written (``FACE``), else ``w-<digest>`` of
    its weights (comma strings hold ``:`` and ``,``, which no file system takes everywhere)."""
    if isinstance(spec, str) and _SAFE_NAME.fullmatch(spec.strip()) and spec.strip().lower() not in RESERVED_ROWS:
        return spec.strip()
    return f"w-{weights_digest(weights)}"


def make_candidates(entries: Iterable[tuple[Any, Mapping[str, float]]]) -> tuple[list[Candidate], list[str]]:
    """Candidates of resolved ``(spec, weights)`` entries, and a message for each one that repeats
    the weights (or, on a case-insensitive file system, the folder) of an earlier one."""
    out: list[Candidate] = []
    problems: list[str] = []
    for spec, weights in entries:
        cand = Candidate(candidate_name(spec, weights), spec_text(spec), dict(weights))
        twin = next((c for c in out if c.weights == cand.weights or c.name.lower() == cand.name.lower()), None)
        if twin is not None:
            problems.append(f"explore: {cand.spec!r} gives the same weights as {twin.spec!r}; list it once")
            continue
        out.append(cand)
    return out, problems


def weight_string(weights: Mapping[str, float], blocks: Iterable[str]) -> str:
    """The copy-ready comma string of ``weights`` over ``blocks`` (every block of the arch, in
    LBW's order): what ``merge = "…"`` and the LBW extension take, meaning exactly these weights."""
    return ",".join(f"{float(weights.get(b, 1.0)):g}" for b in blocks)


def block_off(weights: Mapping[str, float], block: str) -> dict:
    """``weights`` with ``block`` switched off (0)."""
    return {**weights, block: 0.0}


def row_scores(identity_codes: Mapping[str, Mapping[str, float]], leak_codes: Mapping[str, float]) -> dict:
    """The scores of one row: ``identity`` (mean over members of each member's mean distance),
    ``identity_members``, ``identity_codes``, ``leak`` (mean over the leak prompts)."""
    from .identity import mean  # here: numpy only where rows are scored, not where the project loads

    members = {m: mean(d.values()) for m, d in identity_codes.items() if d}
    return {
        "identity": mean(members.values()),
        "identity_members": {m: round(v, 4) for m, v in members.items()},
        "identity_codes": {m: dict(d) for m, d in identity_codes.items()},
        "leak": mean(leak_codes.values()),
        "leak_codes": dict(leak_codes),
    }


def best_row(rows: Mapping[str, Mapping[str, Any]], max_leak: float | None) -> tuple[str | None, str]:
    """The best of ``rows`` (name -> scores; the base row never competes) and why, in words.

    The lowest identity distance among the rows closer to the character than the base model
    and with ``leak <= max_leak`` (None: :data:`LEAK_SLACK` × the chosen row's leak); ties:
    smaller leak, then smaller file. None when no row qualifies (the reason says which bound
    failed).
    """
    bound, said = max_leak, f"{max_leak:g}" if max_leak is not None else ""
    chosen_leak = rows.get(CHOSEN_ROW, {}).get("leak")
    if bound is None:
        bound = chosen_leak * LEAK_SLACK if chosen_leak is not None else float("inf")
        said = f"{bound:.3f} (the chosen weights' leak + {round((LEAK_SLACK - 1) * 100)} %)"
    scored = {n: r for n, r in rows.items() if n != BASE_ROW and r.get("identity") is not None and r.get("leak") is not None}
    if not scored:
        return None, "no candidate has scores yet"
    base = rows.get(BASE_ROW, {}).get("identity")
    if base is not None:
        scored = {n: r for n, r in scored.items() if r["identity"] < base}
        if not scored:
            return None, (f"no row is closer to the character than the base model alone ({base:.3f}): the LoRA "
                          "itself has not learnt it (more steps, a higher lr, or check its pictures)")
    eligible = {n: r for n, r in scored.items() if r["leak"] <= bound}
    if not eligible:
        low = min(scored, key=lambda n: scored[n]["leak"])
        return None, f"every candidate leaks more than {said} (the least: {low}, {scored[low]['leak']:.3f})"
    name = min(eligible, key=lambda n: (eligible[n]["identity"], eligible[n]["leak"], eligible[n].get("size") or 0, n))
    return name, f"lowest identity distance ({eligible[name]['identity']:.3f}) with leak <= {said}"


def block_effects(rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]) -> dict[str, dict]:
    """Per block: how identity and leak change when that block is switched off from the chosen
    weights (``rows``: block -> scores of the block-off render; ``reference``: the chosen
    weights' own scores, rendered the same way). Positive ``identity``: the character got
    farther without the block (the block carries it); negative ``leak``: less leak without it."""
    out = {}
    for block, r in rows.items():
        if r.get("identity") is None or reference.get("identity") is None:
            continue
        out[block] = {"identity": round(r["identity"] - reference["identity"], 4),
                      "leak": round((r.get("leak") or 0.0) - (reference.get("leak") or 0.0), 4)}
    return out


def exploration_prompts(samples: Iterable, pictured: Iterable[str], keywords: Iterable[str]) -> tuple:
    """The prompts every row of an exploration renders, from a LoRA's training sample set:

    * its template codes that have a training picture (the ones identity can score), with the
      training samples' names and seeds (``pictured``: the codes, and for a group's members
      ``<member>/<code>``);
    * for the leak, the level-camera ones (``x0y``: :data:`LEAK_CAMERA`) without the trigger words
      (``notrigger/<code>``, the training's trigger-score prompts), and the neutral prompt.

    Few on purpose: every row renders all of them, and a CPU pays per picture.
    """
    from .sample_prompts import SamplePrompt, split_sample_name, without_triggers

    have = {n for c in pictured for n in (c, c.lower())}
    codes = tuple(s for s in samples if split_sample_name(s.name)[1] and s.name in have)
    if not codes:
        return ()
    level = tuple(s for s in codes if split_sample_name(s.name)[1][1] == LEAK_CAMERA)
    neutral = SamplePrompt(NEUTRAL_NAME, NEUTRAL_PROMPT, codes[0].index)
    return codes + without_triggers(level, keywords) + (neutral,)


def resolve_candidates(entries: Any, settings: Mapping[str, Any]) -> tuple[list[Candidate], list[str]]:
    """The candidates of an ``explore`` list, resolved with the project's presets and arch
    (``settings``: ``{"merge": …, "model": …}``), and a message per entry that fails."""
    from .block_weights import resolve_merge_weights

    if not isinstance(entries, list):
        return [], ["'explore' must be a list of block weights, e.g. [\"FACE\", \"ALL\", \"0,1,1,1,0,…\"]"]
    resolved, problems = [], []
    for spec in entries:
        if not isinstance(spec, (str, list, dict)):
            problems.append(f"explore: {spec!r} is not block weights (a preset name, a comma string, a list or a table)")
            continue
        try:
            resolved.append((spec, resolve_merge_weights(spec, settings)))
        except (ValueError, TypeError) as exc:
            problems.append(f"explore: {spec_text(spec)!r}: {exc}")
    candidates, repeated = make_candidates(resolved)
    return candidates, problems + repeated


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def table_lines(scores: Mapping[str, Any]) -> list[str]:
    """The exploration's table as text lines (``charbuild explore``), best row marked ``*``."""
    rows, order = scores["rows"], scores["order"]
    base = rows.get(BASE_ROW, {}).get("identity")
    width = max(len(n) for n in order) + 2
    lines = [f"  {'':1}{'row':<{width}}{'identity':>9}{'vs base':>9}{'leak':>8}{'size':>9}  weights"]
    for name in order:
        r = rows[name]
        ident, leak = r.get("identity"), r.get("leak")
        change = f"{(ident - base) / base * 100:+.1f}%" if ident is not None and base else "-"
        spec = r.get("spec") or ""
        shown = r.get("weights") or spec
        if r.get("weights") and spec and spec != r["weights"]:
            shown = f"{spec}: {r['weights']}"
        if r.get("same_as_chosen"):
            shown += "  (= chosen)"
        mark = "*" if name == scores.get("best") else " "
        lines.append(f"  {mark}{name:<{width}}{_fmt(ident):>9}{change:>9}{_fmt(leak):>8}{_size(r.get('size')):>9}  {shown}")
    best = scores.get("best")
    lines.append(f"best: {best or 'none'} — {scores.get('why', '')}")
    if best and rows[best].get("weights"):
        lines.append(f'  merge = "{rows[best]["weights"]}"')
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def blocks_lines(analysis: Mapping[str, Any]) -> list[str]:
    """The per-block analysis as text lines: each block's identity and leak change when switched off."""
    effects, skipped = analysis.get("effects", {}), analysis.get("skipped", {})
    lines = ["  block   identity   leak    (change when the block is off; identity + : the block carries the character)"]
    scale = max([abs(e["identity"]) for e in effects.values()] + [1e-9])
    for block in analysis.get("order", []):
        if block in effects:
            e = effects[block]
            bar = ("+" if e["identity"] >= 0 else "-") * max(0, round(abs(e["identity"]) / scale * 20))
            lines.append(f"  {block:<6}{e['identity']:>+9.3f}{e['leak']:>+9.3f}  {bar}")
        elif block in skipped:
            lines.append(f"  {block:<6}{'':>9}{'':>9}  ({skipped[block]})")
    return lines
