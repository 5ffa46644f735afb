"""`python -m paretoken.cli`: the `paretoken` command."""
import sys

from paretoken.cli import main

sys.exit(main())
