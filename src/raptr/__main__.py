import sys

from raptr.cli import main

sys.exit(main())
