"""Fake sd-scripts ``sdxl_train_network.py`` (SDXL, no --clip_skip): see _fake_common.py."""
import sys

from _fake_common import main

if __name__ == "__main__":
    sys.exit(main(sdxl=True))
