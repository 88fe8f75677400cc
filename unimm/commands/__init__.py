"""The commands: each a ``run(cfg)`` over the library (training, inference, data), called by the
CLI, by the pipelines and by tests. A command never imports another command."""
