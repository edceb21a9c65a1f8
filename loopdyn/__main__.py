"""`python -m loopdyn ...` is the same as `loopdyn ...` (so `torchrun -m loopdyn train` works)."""
import sys

from loopdyn.cli import main

sys.exit(main())
