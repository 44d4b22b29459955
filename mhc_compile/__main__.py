import sys

from mhc_compile.cli import main

sys.exit(main())
