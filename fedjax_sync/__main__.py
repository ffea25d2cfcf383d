import sys

from fedjax_sync.cli import main

sys.exit(main())
