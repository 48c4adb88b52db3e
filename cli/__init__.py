"""The `lightbox` command line and the demo: the app on top of every component.

Nothing below imports this package; it composes the core, `db`, `scheduler`, `worker` and
`trainer` into commands."""
