"""Analytic FLOPs: per layer, per training step from the layers actually run, per schedule.

Convention (as in nanoGPT/PaLM MFU and ``torch.utils.flop_counter``): a multiply-add is 2 FLOPs,
only matrix products are counted (norms, activations, softmax are noise), attention scores and
values cost 2·2·T²·d per sequence (no causal halving: the kernels do the full square), and a
training step costs 3× the forward (backward = 2× forward). Tests check the per-layer count
against ``FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass

from raptr.core import Schedule


@dataclass(frozen=True)
class LayerShape:
    d_model: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None  # grouped-query attention (Llama); None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads
    gated_ffn: bool = False  # SwiGLU: three FFN matrices instead of two

    def forward_flops(self, seq_len: int) -> int:
        """Forward FLOPs of one layer on one sequence of ``seq_len`` tokens."""
        hd = self.head_dim or self.d_model // self.n_heads
        q_dim, kv_dim = self.n_heads * hd, (self.n_kv_heads or self.n_heads) * hd
        projections = self.d_model * (q_dim + 2 * kv_dim) + q_dim * self.d_model
        ffn = (3 if self.gated_ffn else 2) * self.d_model * self.d_ff
        attention_macs = 2 * seq_len * seq_len * q_dim  # QK^T and AV: T*T*q_dim multiply-adds each
        return 2 * seq_len * (projections + ffn) + 2 * attention_macs


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs of one training step of a layered model, given which layers run."""

    layer: LayerShape
    num_layers: int
    seq_len: int
    vocab_size: int
    head_positions: float = 1.0  # fraction of positions that get logits (MLM on masked only: ~0.15)
    head_transform: bool = False  # BERT's d×d transform before the decoder

    def layer_forward(self) -> int:
        return self.layer.forward_flops(self.seq_len)

    def head_forward_per_position(self) -> int:
        d = self.layer.d_model
        return 2 * d * self.vocab_size + (2 * d * d if self.head_transform else 0)

    def train_step(self, layers_run: float, batch_size: int, labelled_positions: float | None = None) -> float:
        """3 × forward for ``batch_size`` sequences with ``layers_run`` layers executed.

        ``labelled_positions``: positions that got logits in this batch (exact count); default
        ``head_positions`` of every sequence.
        """
        if labelled_positions is None:
            labelled_positions = batch_size * self.seq_len * self.head_positions
        layers = batch_size * layers_run * self.layer_forward()
        return 3.0 * (layers + labelled_positions * self.head_forward_per_position())

    def full_step(self, batch_size: int, labelled_positions: float | None = None) -> float:
        return self.train_step(self.num_layers, batch_size, labelled_positions)


@dataclass(frozen=True)
class MeasuredFlops:
    """``ModelFlops``'s interface from measured forward FLOPs (``raptr.models.registry.measure_flops``).

    ``layer_flops``: forward FLOPs of each layer on one sequence; ``rest_flops``: everything else
    (mostly the LM head on every position), scaled by ``head_positions`` for the positions that get
    logits. A step with ``layers_run`` layers counts the mean layer that many times (exact when the
    layers are alike, as in every stack of identical blocks).
    """

    layer_flops: tuple[int, ...]
    rest_flops: int
    seq_len: int
    head_positions: float = 1.0

    @property
    def num_layers(self) -> int:
        return len(self.layer_flops)

    def layer_forward(self) -> float:
        return sum(self.layer_flops) / len(self.layer_flops)

    def head_forward_per_position(self) -> float:
        return self.rest_flops / self.seq_len

    def train_step(self, layers_run: float, batch_size: int, labelled_positions: float | None = None) -> float:
        if labelled_positions is None:
            labelled_positions = batch_size * self.seq_len * self.head_positions
        return 3.0 * (batch_size * layers_run * self.layer_forward() + labelled_positions * self.head_forward_per_position())

    def full_step(self, batch_size: int, labelled_positions: float | None = None) -> float:
        return self.train_step(self.num_layers, batch_size, labelled_positions)


def schedule_relative_flops(schedule: Schedule, model: ModelFlops | None = None) -> dict[str, float]:
    """Expected FLOPs of a RaPTr schedule relative to full-model training of equal steps.

    ``layers``: layer FLOPs only (the paper's convention; 0.75 for 6-8-10-12 of 12, equal stages).
    ``model``: with embeddings/head included, for the given model size.
    """
    out = {"layers": schedule.relative_layer_flops()}
    if model is not None:
        mean_path = sum(s.steps * s.path_length for s in schedule.stages) / schedule.total_steps
        out["model"] = model.train_step(mean_path, 1) / model.full_step(1)
    return out
