"""alignkd: knowledge distillation of transformer LMs with feature alignment."""

__version__ = "0.1.0"


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
