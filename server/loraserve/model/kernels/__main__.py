"""`python -m loraserve.model.kernels [--all]`: compile the CPU kernels (see `build.py`)."""

import sys

from loraserve.model.kernels.build import main

sys.exit(main())
