"""`python -m libmoe.cli`, as `libmoe`."""

import sys

from . import main

sys.exit(main())
