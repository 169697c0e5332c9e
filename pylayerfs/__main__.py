import sys

from pylayerfs.cli.main import main

sys.exit(main())
