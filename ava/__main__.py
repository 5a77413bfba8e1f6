"""`python -m ava` is the same as the `ava` console script."""

from ava.cli.main import main

raise SystemExit(main())
