"""``python -m varshift`` runs the command line."""

from varshift.cli import main

raise SystemExit(main())
