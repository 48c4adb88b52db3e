"""`python -m cli`: the same as the `lightbox` command."""

from cli.main import main

main()
