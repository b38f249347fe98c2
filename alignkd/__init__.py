"""alignkd: knowledge distillation of transformer LMs with feature alignment."""

import logging

__version__ = "0.1.0"

# Accelerate's model unwrapping, which transformers' save_pretrained calls, imports deepspeed
# wherever it is installed, and on a machine without a GPU DeepSpeed announces on stdout that it
# uses the CPU. Commands save models before a run tells DeepSpeed its device (the demo converting
# its teacher, a study's stand-in models), so the line is filtered here, before anything can
# import deepspeed; DeepSpeed's other messages stay.
logging.getLogger("DeepSpeed").addFilter(
    lambda record: not record.getMessage().startswith("Setting accelerator to CPU")
)


def distill(config, *, resume: bool = False, overwrite: bool = False, overrides=()):
    """Run a distillation from a Config, a dict or a YAML path; returns the run summary.

    ``resume`` continues the run in ``train.output_dir``; ``overwrite`` replaces it.
    """
    from alignkd.config import Config, load_config
    from alignkd.engine.run import distill as _distill

    if not isinstance(config, Config):
        config = (
            load_config(data=dict(config), overrides=list(overrides))
            if isinstance(config, dict)
            else load_config(config, list(overrides))
        )
    return _distill(config, resume=resume, overwrite=overwrite)
