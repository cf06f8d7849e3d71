"""`python -m hybridprune ...` (and `torchrun ... -m hybridprune ...`): the `hybridprune` command."""

import sys

from hybridprune.cli import main

if __name__ == "__main__":  # importing this module (tools that walk the package do) runs nothing
    sys.exit(main())
