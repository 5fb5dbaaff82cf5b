"""Training: the job (:mod:`.job`), variants (preset grammar), the runner (doit action), its
process handling, run cache and freshness check, the GPU lock, and the backends.

Backends (:mod:`.backends`): ``builtin`` (``python -m charbuild.train.builtin JOB.json``),
``sd-scripts`` (kohya-ss ``train_network.py`` through ``accelerate launch``) and ``fake`` (a
quick stand-in that writes a small valid LoRA, for tests and demos).

Importing this package stays cheap: no torch, no numpy (``doit list`` loads it).
"""

#: The built-in backend names (the registry, :func:`charbuild.train.backends.backend_names`,
#: also holds any backend registered later).
BACKENDS = ("builtin", "sd-scripts", "fake")
