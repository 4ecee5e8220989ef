"""Reference pre-LN transformer: an MLM encoder and a causal / prefix-LM decoder.

Small and explicit on purpose: ``blocks`` is a plain ``nn.ModuleList`` that every method wraps or
grows, and two switches (``layer_norm``, ``residual``) exist for the stability study (the paper's
claim needs both). Logits are computed only where ``labels != -100`` (the MLM head on masked
positions is ~7x cheaper than on all of them at 15% masking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raptr.flops import LayerShape, ModelFlops


@dataclass
class TransformerConfig:
    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 12
    n_heads: int = 2
    d_ff: int = 512
    max_seq_len: int = 128
    causal: bool = False  # False: bidirectional encoder (MLM); True: decoder (causal / prefix LM)
    layer_norm: bool = True  # pre-LN in every block (and a final LN)
    residual: bool = True  # residual connections around attention and FFN
    init_std: float = 0.02


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.residual = cfg.n_heads, cfg.residual
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.layer_norm else nn.Identity
        self.ln1, self.ln2 = norm(), norm()
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        a = self.attention(self.ln1(x), mask, causal)
        x = x + a if self.residual else a
        f = self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x + f if self.residual else f


def prefix_lm_mask(prefix_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bool mask [B,1,T,T]: causal, plus full attention among the first prefix_len[b] positions."""
    pos = torch.arange(seq_len, device=prefix_len.device)
    causal = pos[None, :] <= pos[:, None]
    in_prefix = pos[None, None, :] < prefix_len[:, None, None]  # key j inside the prefix
    query_in_prefix = pos[None, :, None] < prefix_len[:, None, None]
    return (causal[None] | (in_prefix & query_in_prefix)).unsqueeze(1)


class TransformerLM(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def layer_stack(self) -> nn.ModuleList:
        return self.blocks

    def hidden_states(self, input_ids: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        mask = prefix_lm_mask(prefix_len, T) if (self.config.causal and prefix_len is not None) else None
        for block in self.blocks:
            x = block(x, mask, self.config.causal)
        return self.ln_f(x)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy over positions with ``labels != -100`` (labels already aligned)."""
        h = self.hidden_states(input_ids, prefix_len)
        if labels is None:
            return self.head(h)
        keep = labels != -100
        return F.cross_entropy(self.head(h[keep]), labels[keep])

    def flops(self, seq_len: int, head_positions: float = 1.0) -> ModelFlops:
        c = self.config
        return ModelFlops(LayerShape(c.d_model, c.n_heads, c.d_ff), len(self.blocks), seq_len, c.vocab_size, head_positions)
