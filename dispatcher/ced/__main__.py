"""``python -m dispatcher.ced``: the same program as ``ced``."""

import sys

from dispatcher.ced.entry import main

sys.exit(main())
