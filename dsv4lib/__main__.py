import sys

from dsv4lib.cli import main

sys.exit(main())
