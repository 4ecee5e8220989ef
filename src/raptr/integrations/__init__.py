"""Integrations with other training frameworks: ``RaPTrCallback`` for the Hugging Face ``Trainer``."""

from raptr.integrations.hf_trainer import RaPTrCallback

__all__ = ["RaPTrCallback"]
