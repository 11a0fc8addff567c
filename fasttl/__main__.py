import sys

from fasttl.cli import main

sys.exit(main())
