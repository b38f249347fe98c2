"""The parallel back-end: one process, DDP, FSDP2 or DeepSpeed ZeRO-1/2/3, chosen once per run."""
