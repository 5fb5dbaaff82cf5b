"""Fake sd-scripts ``train_network.py`` (SD1.x): see _fake_common.py."""
import sys

from _fake_common import main

if __name__ == "__main__":
    sys.exit(main(sdxl=False))
