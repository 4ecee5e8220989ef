"""Tiny configs of transformers architectures for the survey test (tests/test_arch_survey.py).

Each entry: the model and config classes, tiny config kwargs (4 layers, eager attention, no
dropout), the dotted paths of the model's layer stack(s) in module order, and the task.
"""

from dataclasses import dataclass, field

import torch
import transformers


@dataclass(frozen=True)
class Arch:
    cls: str
    config: str
    kwargs: dict
    layers: tuple
    task: str  # mlm | causal | seq2seq
    notes: str = ""


H = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=128)
DEC = dict(H, num_hidden_layers=4, max_position_embeddings=64)
KV = dict(DEC, num_key_value_heads=2)
ENC = dict(H, num_hidden_layers=4, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

ZOO = {
    "bert": Arch("BertForMaskedLM", "BertConfig", ENC, ("bert.encoder.layer",), "mlm"),
    "roberta": Arch("RobertaForMaskedLM", "RobertaConfig", ENC, ("roberta.encoder.layer",), "mlm"),
    "xlm-roberta": Arch("XLMRobertaForMaskedLM", "XLMRobertaConfig", ENC, ("roberta.encoder.layer",), "mlm"),
    "electra": Arch("ElectraForMaskedLM", "ElectraConfig", dict(ENC, embedding_size=16), ("electra.encoder.layer",), "mlm",
                    "factorised embeddings (16) and generator head"),
    "distilbert": Arch("DistilBertForMaskedLM", "DistilBertConfig",
                       dict(dim=32, n_layers=4, n_heads=4, hidden_dim=64, vocab_size=128, max_position_embeddings=64,
                            dropout=0.0, attention_dropout=0.0), ("distilbert.transformer.layer",), "mlm"),
    "modernbert": Arch("ModernBertForMaskedLM", "ModernBertConfig",
                       dict(H, num_hidden_layers=4, max_position_embeddings=64, pad_token_id=0, global_attn_every_n_layers=2,
                            local_attention=16), ("model.layers",), "mlm", "alternating global/local attention"),
    "deberta-v2": Arch("DebertaV2ForMaskedLM", "DebertaV2Config", ENC, ("deberta.encoder.layer",), "mlm", "tuple layers"),
    "gpt2": Arch("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=64,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), ("transformer.h",), "causal"),
    "gptj": Arch("GPTJForCausalLM", "GPTJConfig", dict(n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=64,
                                                       rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                 ("transformer.h",), "causal"),
    "gpt_neo": Arch("GPTNeoForCausalLM", "GPTNeoConfig", dict(hidden_size=32, num_layers=4, num_heads=4, vocab_size=128,
                                                              max_position_embeddings=64, attention_types=[[["global", "local"], 2]],
                                                              window_size=8), ("transformer.h",), "causal", "tuple layers"),
    "gpt_neox": Arch("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(DEC), ("gpt_neox.layers",), "causal"),
    "opt": Arch("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
                                                    vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32,
                                                    dropout=0.0), ("model.decoder.layers",), "causal"),
    "bloom": Arch("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=4, n_head=4, vocab_size=128),
                  ("transformer.h",), "causal", "tuple layers, ALiBi"),
    "falcon": Arch("FalconForCausalLM", "FalconConfig", dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                             vocab_size=128), ("transformer.h",), "causal", "tuple layers"),
    "mpt": Arch("MptForCausalLM", "MptConfig", dict(d_model=32, n_layers=4, n_heads=4, vocab_size=128, max_seq_len=64),
                ("transformer.blocks",), "causal", "tuple layers, ALiBi"),
    "llama": Arch("LlamaForCausalLM", "LlamaConfig", KV, ("model.layers",), "causal"),
    "mistral": Arch("MistralForCausalLM", "MistralConfig", KV, ("model.layers",), "causal"),
    "mixtral": Arch("MixtralForCausalLM", "MixtralConfig", dict(KV, num_local_experts=4, num_experts_per_tok=2),
                    ("model.layers",), "causal", "MoE: 4 experts per layer (a nested ModuleList of the same length)"),
    "qwen2": Arch("Qwen2ForCausalLM", "Qwen2Config", KV, ("model.layers",), "causal"),
    "qwen3": Arch("Qwen3ForCausalLM", "Qwen3Config", dict(KV, head_dim=8), ("model.layers",), "causal"),
    "qwen2_moe": Arch("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(KV, num_experts=4, num_experts_per_tok=2,
                                                                    moe_intermediate_size=32, shared_expert_intermediate_size=32),
                      ("model.layers",), "causal", "MoE with a shared expert"),
    "qwen3_moe": Arch("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(KV, num_experts=4, num_experts_per_tok=2,
                                                                    moe_intermediate_size=32, head_dim=8),
                      ("model.layers",), "causal", "MoE"),
    "olmoe": Arch("OlmoeForCausalLM", "OlmoeConfig", dict(KV, num_experts=4, num_experts_per_tok=2), ("model.layers",), "causal",
                  "MoE"),
    "phi": Arch("PhiForCausalLM", "PhiConfig", dict(DEC, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
                ("model.layers",), "causal", "parallel attention + MLP"),
    "phi3": Arch("Phi3ForCausalLM", "Phi3Config", dict(KV, pad_token_id=0), ("model.layers",), "causal", "fused qkv, gate_up"),
    "gemma": Arch("GemmaForCausalLM", "GemmaConfig", dict(KV, head_dim=8), ("model.layers",), "causal"),
    "gemma2": Arch("Gemma2ForCausalLM", "Gemma2Config", dict(KV, head_dim=8, sliding_window=8), ("model.layers",), "causal",
                   "alternating sliding-window / full attention, logit soft-capping"),
    "gemma3": Arch("Gemma3ForCausalLM", "Gemma3TextConfig", dict(KV, head_dim=8, sliding_window=8), ("model.layers",), "causal"),
    "olmo2": Arch("Olmo2ForCausalLM", "Olmo2Config", dict(KV), ("model.layers",), "causal"),
    "starcoder2": Arch("Starcoder2ForCausalLM", "Starcoder2Config", dict(KV, residual_dropout=0.0, embedding_dropout=0.0),
                       ("model.layers",), "causal"),
    "stablelm": Arch("StableLmForCausalLM", "StableLmConfig", dict(KV), ("model.layers",), "causal"),
    "granite": Arch("GraniteForCausalLM", "GraniteConfig", dict(KV), ("model.layers",), "causal"),
    "t5": Arch("T5ForConditionalGeneration", "T5Config", dict(d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=4,
                                                            num_heads=4, vocab_size=128, dropout_rate=0.0),
               ("encoder.block", "decoder.block"), "seq2seq", "tuple layers, position bias from each stack's block 0"),
    "bart": Arch("BartForConditionalGeneration", "BartConfig", dict(d_model=32, encoder_layers=4, decoder_layers=4,
                                                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                                                  encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128,
                                                                  max_position_embeddings=64, dropout=0.0),
                 ("model.encoder.layers", "model.decoder.layers"), "seq2seq"),
    "albert": Arch("AlbertForMaskedLM", "AlbertConfig", dict(ENC, embedding_size=16), ("albert.encoder.albert_layer_groups",),
                   "mlm", "one shared layer group used num_hidden_layers times: refused"),
}


def build(name: str):
    """(model, config) of a ZOO entry, seeded, eager attention."""
    arch = ZOO[name]
    cfg = getattr(transformers, arch.config)(**arch.kwargs)
    cfg._attn_implementation = "eager"
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2  # inside the tiny vocabulary
    torch.manual_seed(0)
    return getattr(transformers, arch.cls)(cfg), cfg
