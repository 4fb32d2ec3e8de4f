"""Tiny but real models for tests and the offline demo: a trained BPE tokenizer and a small Llama.

The tokenizer is what a real checkpoint ships (byte-level BPE, special tokens, a chat template),
so lm-eval, chat templating and `save_pretrained` treat it exactly as they treat Llama's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from merge_harness.train.prompts import FASTCHAT_SYSTEM

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# FastChat's Vicuna v1.1 conversation format, the template the SLTA paper's fine-tunes used, as
# a Jinja chat template (merge_harness.train.prompts renders the same text for `fastchat`).
FASTCHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '" + FASTCHAT_SYSTEM.replace("'", "\\'") + "' %}{% endif %}"
    "{{ bos_token }}{{ system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE trained on `texts` (any string encodes: all 256 bytes are in the vocab).

    No BOS is added automatically: the chat template writes it, and lm-eval adds none itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, UNK]
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    fast.chat_template = FASTCHAT_TEMPLATE
    return fast


def tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
):
    """A randomly initialised LlamaForCausalLM sized for `tokenizer`; same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,  # rotary: costs no parameters
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
