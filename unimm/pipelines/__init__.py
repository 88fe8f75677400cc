"""Pipelines: compositions of commands, run in-process the way a user would run them one after
the other (``unimm quickstart``, ``unimm eval ablate``)."""
