"""The distillation engine: run set-up, the step, the loop, checkpoints, the plan of terms, captures and weights."""
