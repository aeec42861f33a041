"""``python -m pytest_kipik ...``: the same as the ``kipik`` command."""

import sys

from pytest_kipik.cli import main

sys.exit(main())
