"""The `gemma2-ref` command line (the edge): main.py parses, commands.py calls the layers below, options.py holds
the option types and the options that cannot go together.
"""

from .main import *  # noqa: F401,F403  (`gemma2_ref.cli.main`, the console script's entry point)
from .main import build_parser, main  # noqa: F401
