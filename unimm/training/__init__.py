"""Training: the loop and its lifecycle (:mod:`~unimm.training.trainer`), one step with its losses
(:mod:`~unimm.training.step`, :mod:`~unimm.training.losses`) and the collectives across processes
(:mod:`~unimm.training.distributed`)."""
