"""`python -m domaintune` (also what `torchrun -m domaintune` and `accelerate launch -m domaintune` run)."""
import sys

from .cli import main

sys.exit(main())
