"""``python -m ocpp_edge`` and the ``ocpp-edge`` console script."""

import sys

from ocpp_edge.daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
