"""``python -m ekmesh.cli``: the ``ekmesh`` command."""

import sys

from ekmesh.cli.main import main

sys.exit(main())
