"""norouter-trio: NoRouter ("IP over stdio") on trio."""

__version__ = "0.1.0"
