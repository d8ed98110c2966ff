"""``python -m bnfold.cli``: the ``bnfold`` command."""

import sys

from bnfold.cli.commands import main

sys.exit(main())
