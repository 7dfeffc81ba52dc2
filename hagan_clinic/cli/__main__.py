"""``python -m hagan_clinic.cli``: the same as the ``hagan-clinic`` command."""

import sys

from . import main

sys.exit(main())
