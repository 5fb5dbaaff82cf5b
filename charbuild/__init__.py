"""charbuild: character pictures in, LoRA files out, as an incremental doit build."""

__version__ = "0.1.0"
