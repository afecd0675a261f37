import sys

from defectd.cli import main

sys.exit(main())
