import sys

from cattn.apps.cli import main

sys.exit(main())
