import sys

from pylayerfs.cli import main

sys.exit(main())
