import sys

from bye_fast.cli import main

sys.exit(main())
