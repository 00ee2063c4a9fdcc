"""``python -m attnkit.eval ...`` (the same as ``attnkit eval ...``)."""

import sys

from .main import main

sys.exit(main())
