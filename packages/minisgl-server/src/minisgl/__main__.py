"""`python -m minisgl`: the same as the `minisgl` command."""

from minisgl.server.cli import main

raise SystemExit(main())
