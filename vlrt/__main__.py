import sys

from vlrt.cli import main

sys.exit(main())
