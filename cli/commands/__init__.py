"""`lightbox` command groups, one module per area, registered at the bottom of cli.main."""
