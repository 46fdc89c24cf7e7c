"""Serve a prompt-tuned or prefix-tuned PEFT model through the plain causal-LM call
that scoring and generation use (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values``, ``logits_to_keep``).

PEFT's own forward for prompt learning rebuilds the virtual tokens on every call and
ignores (prompt tuning) or overwrites (prefix tuning) a ``past_key_values`` passed in,
so the shared-prefix KV cache of inference/scoring.py would silently drop the soft prompt.
Both methods are, exactly, a fixed prefix of ``n`` virtual positions in front of every
sequence: here that prefix is computed once as a KV cache (prefix tuning: the learned
keys/values; prompt tuning: the base model run over the soft prompt embeddings) and
put in front of whatever the caller sends, with the attention mask widened by ``n``
and the position ids shifted by ``n`` (as during training, where real tokens sit at
positions ``n ...``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class VirtualTokenModel(nn.Module):
    def __init__(self, peft_model):
        super().__init__()
        from peft import PeftType

        self.peft_model = peft_model
        cfg = peft_model.active_peft_config
        self.n = cfg.num_virtual_tokens
        self.base = peft_model.get_base_model()
        with torch.no_grad():
            if cfg.peft_type == PeftType.PREFIX_TUNING:
                self.cache = peft_model.get_prompt(batch_size=1, max_cache_len=self.n + 1)
            else:
                prompts = peft_model.get_prompt(batch_size=1).to(self.base.dtype)
                self.cache = self.base(inputs_embeds=prompts, use_cache=True).past_key_values

    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    @property
    def device(self):
        return self.base.device

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, **kwargs):
        B = input_ids.shape[0] if input_ids is not None else kwargs["inputs_embeds"].shape[0]
        if past_key_values is None:  # a fresh call: start from the virtual prefix
            past_key_values = copy.deepcopy(self.cache)
            if B > 1:
                past_key_values.batch_repeat_interleave(B)
        if attention_mask is not None and attention_mask.dim() == 2:
            ones = torch.ones((B, self.n), dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + self.n
        return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=True if use_cache is None else use_cache,
                         **kwargs)

    def generate(self, *args, **kwargs):
        """Generation goes through PEFT's own prompt-learning generate."""
        return self.peft_model.generate(*args, **kwargs)
