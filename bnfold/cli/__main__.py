"""``python -m bnfold.cli``: the ``bnfold`` command."""

import sys

from bnfold.cli import main

sys.exit(main())
