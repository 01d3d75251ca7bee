import sys

from authmilter.cli import main

sys.exit(main())
