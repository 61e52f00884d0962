"""``python -m vtp.app`` (and ``torchrun ... -m vtp.app``) runs the ``vtp`` command."""
import sys

from .cli import main

sys.exit(main())
