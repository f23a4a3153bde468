"""``python -m tli.cli``: the same as the ``tli`` command."""

import sys

from tli.cli import main

sys.exit(main())
