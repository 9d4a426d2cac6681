"""`python -m loraserve_client COMMAND ...`: the client commands without the server package."""

import sys

from loraserve_client.cli import main

sys.exit(main())
