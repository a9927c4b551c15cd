"""``python -m trainer.board``: `trainer.board.cli.main`."""

import sys

from trainer.board.cli import main

sys.exit(main())
