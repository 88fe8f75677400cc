"""Run ``unimm`` under accelerate's FSDP version 2 on CPU processes (a test helper, not a test).

accelerate enables FSDP only on accelerators and turns it into CPU DDP otherwise, although
PyTorch's FSDP2 runs on CPU with gloo. Launched as ``accelerate launch --config_file
recipes/accelerate/fsdp.yaml tests/fsdp_on_cpu.py train ...``, the plugin is built from the
environment that launch sets from the shipped config, and the accelerator's state is switched to
FSDP right after it is made; everything else (prepare, sharding, state dicts) is accelerate's and
torch's own code, as on GPUs.
"""

from __future__ import annotations

import sys

import accelerate
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


class FSDPOnCPU(accelerate.Accelerator):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
        if self.state.mixed_precision != "no":  # as accelerate's own FSDP set-up does
            plugin.set_mixed_precision(self.state.mixed_precision)
        self.state.fsdp_plugin = plugin
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    def prepare(self, *args, **kwargs):
        """accelerate's prepare; then report the sharded parameters and FSDP units (the test reads it)."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        prepared = super().prepare(*args, **kwargs)
        for obj in prepared:
            if isinstance(obj, torch.nn.Module):
                params = list(obj.parameters())
                sharded = sum(isinstance(p, DTensor) for p in params)
                units = sum(isinstance(m, FSDPModule) for m in obj.modules())
                # One write per line: two ranks share stderr, and print() writes the newline apart.
                line = f"fsdp-on-cpu: {sharded}/{len(params)} parameters sharded in {units} units\n"
                sys.stderr.write(line)
                sys.stderr.flush()
        return prepared


accelerate.Accelerator = FSDPOnCPU

if __name__ == "__main__":
    from unimm.cli import main

    main()
