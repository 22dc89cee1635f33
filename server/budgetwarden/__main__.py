import sys

from budgetwarden.cli import main

sys.exit(main())
