"""``python -m dispatcher.ced``: the same program as ``ced``."""

import sys

from dispatcher.ced.main import main

sys.exit(main())
