"""Integrations with other training frameworks: the Hugging Face ``Trainer`` (and Lightning, with ``raptr[lightning]``)."""

from raptr.integrations.hf_trainer import MethodCallback, MethodTrainerMixin, RaPTrCallback, RaptrTrainer

__all__ = ["MethodCallback", "MethodTrainerMixin", "RaPTrCallback", "RaptrTrainer"]
