import sys

from jaxlm.generate.cli import main

sys.exit(main())
