"""The builtin trainer's step-0 baseline, identity per sample step and trigger score.

Part of the trainer's observers (:class:`.trainer.Observers`): before the first step the
samples are rendered by the base model *without* the LoRA (every adapter's multiplier 0, so a
``continue_from`` LoRA is off too) as ``samples/0/``; at every sample step each template-code
sample is scored against the LoRA's own training picture of that code
(:mod:`charbuild.train.scoring`); at step 0 and after the last step the same prompts without
the trigger words are rendered too (``samples/<step>/notrigger/``) and their distance is the
trigger score. Everything is written to ``metrics.jsonl``; rendering follows
:class:`.samples.SampleRenderer` (fixed seeds, the global random state restored), so none of it
changes the LoRA's bytes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from charbuild.train import scoring


@contextlib.contextmanager
def adapters_off(network):
    """Every LoRA/LoHa module of ``network`` at multiplier 0 (the bare base model), restored after."""
    modules = list(network.unet_loras) + list(network.te_loras)
    saved = [m.multiplier for m in modules]
    for m in modules:
        m.multiplier = 0.0
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.multiplier = value


class IdentityWatch:
    """Baseline samples, identity lines and the trigger score of one training."""

    def __init__(self, setup, prep, renderer, folder: str | Path, metrics):
        from .samples import SampleRenderer

        self.setup, self.prep, self.renderer, self.metrics = setup, prep, renderer, metrics
        self.refs = scoring.references(setup.job)
        untriggered = scoring.without_triggers(renderer.samples, setup.job.keywords)
        self.notrigger = SampleRenderer(setup, prep, untriggered, folder) if untriggered else None
        self.base_notrigger: dict[str, Path] = {}

    def describe(self) -> str:
        members = ", ".join(f"{m} ({len(c)} codes)" for m, c in self.refs.items()) or "no training picture of a sample code"
        return f"identity against {members}; step 0 = the base model without the LoRA"

    def baseline(self) -> None:
        """Step 0: the samples (and the prompts without trigger words) of the base model alone."""
        with adapters_off(self.prep.network):
            written = self.renderer.render(0)
            if self.notrigger is not None:
                self.base_notrigger = scoring.files_by_name(self.notrigger.render(0), self.renderer.step_folder(0))
        self._score(0, written)

    def after(self, step: int, written: list[Path], last: bool) -> None:
        """Score the samples just rendered at ``step``; after the last step also the trigger score."""
        self._score(step, written)
        if last and self.notrigger is not None and self.base_notrigger:
            mine = scoring.files_by_name(self.notrigger.render(step), self.renderer.step_folder(step))
            line = scoring.trigger_line(step, mine, self.base_notrigger)
            if line is not None:
                self.metrics.write(line)

    def _score(self, step: int, written: list[Path]) -> None:
        if not self.refs:
            return
        line = scoring.identity_line(step, scoring.files_by_name(written, self.renderer.step_folder(step)), self.refs)
        if line is not None:
            self.metrics.write(line)
