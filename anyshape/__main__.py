import sys

from anyshape.cli import main

sys.exit(main())
