"""``python -m curvlab`` (and ``torchrun ... -m curvlab``): the ``curvlab`` command."""

import sys

from curvlab.cli import main

sys.exit(main())
