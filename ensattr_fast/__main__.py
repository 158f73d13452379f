"""``python -m ensattr_fast`` is the ``ensattr`` command."""

import sys

from .cli import main

sys.exit(main())
