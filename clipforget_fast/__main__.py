"""``python -m clipforget_fast``: the command line (clipforget_fast/cli.py)."""
import sys

from .cli import main

sys.exit(main())
