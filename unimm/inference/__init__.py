"""Inference with a trained checkpoint: one session (:mod:`~unimm.inference.session`); indexes
written (:mod:`~unimm.inference.index`) and read (:mod:`~unimm.inference.store`) with their
documents (:mod:`~unimm.inference.documents`) and saved ANN index (:mod:`~unimm.inference.ann`);
search (:mod:`~unimm.inference.search`), chat (:mod:`~unimm.inference.chat`), the HTTP server
(:mod:`~unimm.inference.server`, :mod:`~unimm.inference.serving`, :mod:`~unimm.inference.api`),
export (:mod:`~unimm.inference.export`, :mod:`~unimm.inference.st_encoder`), evaluation
(:mod:`~unimm.inference.evaluate`) and its metrics (:mod:`~unimm.inference.metrics`)."""
