"""``python -m vlmsae <job> ...``: the ``vlmsae`` command without installing its script (see :mod:`vlmsae.cli`)."""

import sys

from vlmsae.cli import main

if __name__ == "__main__":
    sys.exit(main())
