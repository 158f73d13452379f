"""``python -m ensattr_fast`` is the ``ensattr`` command."""

import sys

from .cli.main import main

sys.exit(main())
