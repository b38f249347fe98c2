"""alignkd: knowledge distillation of transformer LMs with feature alignment."""

__version__ = "0.1.0"
