"""One module per `tli` sub-command; each has ``register(subparsers)``."""
