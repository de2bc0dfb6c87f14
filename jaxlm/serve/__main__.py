import sys

from jaxlm.serve.cli import main

sys.exit(main())
