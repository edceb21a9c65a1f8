"""`python -m loopdyn ...` is the same as `loopdyn ...` (so `torchrun -m loopdyn train` works)."""
import sys

try:
    from loopdyn.cli import main
except KeyboardInterrupt:  # Ctrl-C before the command line is even loaded
    sys.stderr.write("loopdyn: interrupted\n")
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
