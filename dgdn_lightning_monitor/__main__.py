"""``python -m dgdn_lightning_monitor``: the ``dgdn-monitor`` command."""

import sys

from dgdn_lightning_monitor.cli import main

if __name__ == "__main__":
    sys.exit(main())
