"""The parallel back-end: one process, DDP, FSDP2 or DeepSpeed ZeRO-1/2/3, chosen once per run (``make_backend``).

- :mod:`~alignkd.backend.strategy`: the ``Backend`` object the set-up, step and checkpoints call.
- :mod:`~alignkd.backend.launch`: how this process was launched, and its Accelerator.
- :mod:`~alignkd.backend.fsdp` and :mod:`~alignkd.backend.zero`: the FSDP2 and DeepSpeed mechanics.
"""

from alignkd.backend.launch import end_launch, exit_launch, launched_processes, make_accelerator
from alignkd.backend.strategy import FSDP2, Backend, ZeRO, make_backend

__all__ = [
    "FSDP2",
    "Backend",
    "ZeRO",
    "end_launch",
    "exit_launch",
    "launched_processes",
    "make_accelerator",
    "make_backend",
]
