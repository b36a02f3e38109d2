"""`python -m serve.dataset`: see serve/dataset/cli.py."""

import sys

from serve.dataset.cli import main

if __name__ == "__main__":
    sys.exit(main())
