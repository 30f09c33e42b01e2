import sys

from geobind.cli import main

sys.exit(main())
