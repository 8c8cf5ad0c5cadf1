"""Configuration of an lctrain hybrid language model exported by `lctrain convert-hf` (Hugging Face remote code).

The model is a string of sublayers (``pattern``), one symbol each, every one a pre-norm residual block
x + f(RMSNorm(x)):  G Gated DeltaNet, S Gated Slot Attention, M Mamba2, B Block-State Transformer layer,
* full causal attention, W sliding-window attention, - SwiGLU MLP.
Each mixer's section holds its resolved sizes (no defaults left to work out).
"""
from transformers import PretrainedConfig


class LctrainConfig(PretrainedConfig):
    model_type = "lctrain"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, pattern="G-", vocab_size=512, hidden_size=256, ffn_hidden_size=704, norm_eps=1e-6,
                 tie_word_embeddings=True, gated_deltanet=None, gated_slot_attention=None, attention=None,
                 mamba2=None, block_state=None, **kwargs):
        self.pattern = pattern
        self.num_hidden_layers = len(pattern)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.norm_eps = norm_eps
        self.gated_deltanet = dict(gated_deltanet or {})
        self.gated_slot_attention = dict(gated_slot_attention or {})
        self.attention = dict(attention or {})
        self.mamba2 = dict(mamba2 or {})
        self.block_state = dict(block_state or {})
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
