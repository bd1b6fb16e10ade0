"""``python -m gemmakit.cli``: what torchrun and the tests launch."""

import sys

from gemmakit.cli import main

sys.exit(main())
