"""`python -m core ...` from the repo root is the same CLI as the `lora-resize` console script."""
import sys

from .cli import console_main

sys.exit(console_main())
