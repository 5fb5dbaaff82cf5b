"""LoRA file toolkit: read/write (io), block weights (blocks), merge, compress, combine,
names and history (provenance), inspect.

Pure functions over ``dict[str, Tensor]`` + metadata; files are read and written only at the
edges (``load_lora``, ``save_lora``, the ``*_file`` functions). Submodules import torch, so this
package itself stays light: import ``charbuild.lora.io`` etc. where needed.
"""

__all__ = ["io", "blocks", "merge", "compress", "combine", "provenance", "inspect", "cli", "keysets"]
