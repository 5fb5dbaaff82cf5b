"""charbuild: `doit` builds every target of the project in characters/ (see README.md)."""
from charbuild.dodo import *  # noqa: F401,F403  (all logic lives in the package)
