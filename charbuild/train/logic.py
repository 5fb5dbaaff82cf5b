"""The original framework's variant grammar: a *logic* string names network, alpha mode and optimizer.

``(Lora3x3|Lora1x1|Locon|Loha)(A1|A50p)-(AdamW8|AdaFactor)`` (the original script's
misspelling ``AdaFacotor`` is accepted too). What each part stands for is
:func:`charbuild.train.variants.resolve_variant`'s (charframework-rules.md §6). A variant
table names its logic with the key ``preset``. Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..checks import closest

NETWORKS = ("Lora3x3", "Lora1x1", "Locon", "Loha")
ALPHA_MODES = ("A1", "A50p")
OPTIMIZER_PRESETS = ("AdamW8", "AdaFactor")
#: Optimizer part spellings accepted in a logic string -> canonical spelling.
_OPTIMIZER_SPELLINGS = {"AdamW8": "AdamW8", "AdaFactor": "AdaFactor", "AdaFacotor": "AdaFactor"}

_LOGIC_RE = re.compile(r"^(Lora3x3|Lora1x1|Locon|Loha)(A1|A50p)-(AdamW8|AdaFactor|AdaFacotor)$")


class Logic(NamedTuple):
    """A parsed logic string: network type, alpha mode and optimizer preset (canonical spellings)."""

    network: str  # Lora3x3 | Lora1x1 | Locon | Loha
    alpha_mode: str  # A1 | A50p
    optimizer: str  # AdamW8 | AdaFactor

    def __str__(self) -> str:
        return f"{self.network}{self.alpha_mode}-{self.optimizer}"


ALL_LOGICS = tuple(str(Logic(n, a, o)) for n in NETWORKS for a in ALPHA_MODES for o in OPTIMIZER_PRESETS)


def parse_logic(text: str) -> Logic:
    """Parse a logic string such as ``"Lora3x3A50p-AdamW8"``.

    Accepts the original misspelling ``AdaFacotor`` (returned as ``AdaFactor``).
    Raises ValueError naming the wrong part and the closest valid logic.
    """
    if not isinstance(text, str):
        raise ValueError(f"a training preset must be a string like 'Lora3x3A50p-AdamW8', not {text!r}")
    m = _LOGIC_RE.match(text)
    if m:
        return Logic(m.group(1), m.group(2), _OPTIMIZER_SPELLINGS[m.group(3)])
    close = closest(text, ALL_LOGICS)
    head, sep, opt = text.partition("-")
    if not sep:
        detail = "it needs a '-' before the optimizer (AdamW8 or AdaFactor)"
    elif opt not in _OPTIMIZER_SPELLINGS:
        detail = f"unknown optimizer {opt!r}, expected AdamW8 or AdaFactor"
    else:
        net = next((n for n in NETWORKS if head.startswith(n)), None)
        if net is None:
            detail = f"unknown network in {head!r}, expected one of {', '.join(NETWORKS)}"
        else:
            detail = f"unknown alpha mode {head[len(net):]!r}, expected A1 or A50p"
    hint = ""
    if close:
        hint = f" (did you mean {close[0]!r}?)"
    raise ValueError(
        f"unknown training preset {text!r}{hint}: {detail}; the grammar is "
        "(Lora3x3|Lora1x1|Locon|Loha)(A1|A50p)-(AdamW8|AdaFactor)"
    )
