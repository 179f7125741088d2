import sys

from cattn.cli import main

sys.exit(main())
