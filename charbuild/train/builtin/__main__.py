"""``python -m charbuild.train.builtin JOB.json``."""

import sys

from charbuild.train.builtin import main

if __name__ == "__main__":
    sys.exit(main())
