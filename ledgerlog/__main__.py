import sys

from ledgerlog.cli import main

sys.exit(main())
