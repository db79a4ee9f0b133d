"""Tiny random HF models saved as HF directories, and greedy references computed by HF
transformers itself (the reference that is not ours)."""

from __future__ import annotations

import torch


def tiny_hf_model(kind: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=384, max_position_embeddings=256)
    if kind == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    elif kind == "llama3-rope":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }
        cfg = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            rope_scaling=rope,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            **common,
        )
    elif kind == "llama-linear-rope":
        rope = {"rope_type": "linear", "factor": 2.0}
        cfg = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            rope_scaling=rope,
            **common,
        )
    elif kind == "opt":
        cfg = tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **common,
        )
    elif kind == "opt-350m-like":
        cfg = tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            **common,
        )
    elif kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=384, n_positions=256)
    else:
        raise ValueError(kind)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Larger weights than HF's init: sharper distributions, so greedy ties are rare.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    return model.eval()


@torch.inference_mode()
def hf_greedy(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation and its logits at every generated position [n, vocab]."""
    ids = torch.tensor([prompt])
    n = max_new_tokens
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, torch.cat(out.logits).float()
