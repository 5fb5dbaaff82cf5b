"""Training: variants (preset grammar), the runner (doit action), GPU lock and backends.

Backends: ``builtin`` (``python -m charbuild.train.builtin JOB.json``), ``sd-scripts``
(kohya-ss ``train_network.py`` through ``accelerate launch``) and ``fake`` (a quick
stand-in that writes a small valid LoRA, for tests and demos).

Importing this package stays cheap: no torch, no numpy (``doit list`` loads it).
"""

BACKENDS = ("builtin", "sd-scripts", "fake")
