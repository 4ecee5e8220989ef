"""Hugging Face ``transformers`` models built from a config (no weight downloads), trainable by
the same trainer as the reference models: same ``forward(input_ids, labels) -> loss`` contract
with labels already aligned, logits only at labelled positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raptr.flops import ModelFlops
from raptr.models.registry import find_layer_stack, model_flops


def build_hf_model(hf_type: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                   max_seq_len: int) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if hf_type in ("bert", "roberta"):
        cls_cfg, cls_model = (tf.BertConfig, tf.BertForMaskedLM) if hf_type == "bert" else (tf.RobertaConfig, tf.RobertaForMaskedLM)
        extra = 2 if hf_type == "roberta" else 0  # RoBERTa's positions start at padding_idx + 1
        cfg = cls_cfg(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      intermediate_size=d_ff, max_position_embeddings=max_seq_len + extra, **no_dropout, **common)
    elif hf_type == "gpt2":
        cls_model = tf.GPT2LMHeadModel
        cfg = tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_ff, n_positions=max_seq_len,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif hf_type == "llama":
        cls_model = tf.LlamaForCausalLM
        cfg = tf.LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             num_key_value_heads=n_heads, intermediate_size=d_ff, max_position_embeddings=max_seq_len,
                             tie_word_embeddings=True, **common)
    elif hf_type == "opt":
        cls_model = tf.OPTForCausalLM
        cfg = tf.OPTConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads, ffn_dim=d_ff,
                           word_embed_proj_dim=d_model, max_position_embeddings=max_seq_len, dropout=0.0,
                           attention_dropout=0.0, **common)
    elif hf_type == "gpt_neox":
        cls_model = tf.GPTNeoXForCausalLM
        cfg = tf.GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               intermediate_size=d_ff, max_position_embeddings=max_seq_len, hidden_dropout=0.0,
                               attention_dropout=0.0, **common)
    else:
        raise ValueError(hf_type)
    return cls_model(cfg)


class HFLanguageModel(nn.Module):
    """Adapter: ``self.hf`` is the plain transformers model (``.hf.save_pretrained`` works)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.is_mlm = hf_model.config.model_type in ("bert", "roberta")

    def layer_stack(self) -> nn.ModuleList:
        return find_layer_stack(self.hf)

    def _head(self) -> nn.Module:
        if self.hf.config.model_type == "bert":
            return self.hf.cls  # transform + decoder
        if self.hf.config.model_type == "roberta":
            return self.hf.lm_head
        return self.hf.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, prefix_len=None) -> torch.Tensor:
        hidden = self.hf.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        if labels is None:
            return self._head()(hidden)
        keep = labels != -100
        return F.cross_entropy(self._head()(hidden[keep]), labels[keep])

    def flops(self, seq_len: int, head_positions: float = 1.0) -> ModelFlops:
        return model_flops(self.hf, seq_len, head_positions)
