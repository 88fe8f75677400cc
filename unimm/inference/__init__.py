"""Inference with a trained checkpoint: the embedding index (:mod:`~unimm.inference.index`),
search (:mod:`~unimm.inference.search`), chat (:mod:`~unimm.inference.chat`), evaluation
(:mod:`~unimm.inference.evaluate`) and its metrics (:mod:`~unimm.inference.metrics`)."""
