import sys

from budgetwarden._cli import main

sys.exit(main())
