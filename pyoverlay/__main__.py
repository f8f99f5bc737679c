"""Allow ``python -m pyoverlay``."""

from pyoverlay.cli import main

raise SystemExit(main())
