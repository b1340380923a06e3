"""`python -m gemma2_ref.cli`: the same as the `gemma2-ref` command."""

import sys

from .main import main

sys.exit(main())
