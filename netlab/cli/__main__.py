"""``python -m netlab.cli`` (the tests run the command line this way, as a user's shell would)."""

import sys

from netlab.cli import main

sys.exit(main())
