"""A tiny word-level tokenizer with a chat template, for tests that need a real HF tokenizer
without downloading one.

``build_tiny_tokenizer(save_dir)`` trains it on a few sentences, saves it (tokenizer.json,
tokenizer_config.json with the chat template) into ``save_dir`` and returns it.  Give the
model ``vocab_size=len(tokenizer)`` and ``eos_token_id=tokenizer.eos_token_id``.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france ? paris is the capital of france .",
    "hello , how are you today ? i am fine , thank you .",
    "a small model writes a short answer to every question",
    "one two three four five six seven eight nine ten",
]

# Roles become special tokens; every turn ends with <eos>, as most instruct templates do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <eos> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_tokenizer(save_dir: str | Path):
    """Train a word-level tokenizer on ``CORPUS``, save it to ``save_dir``, return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # Splitting on whitespace only keeps the vocabulary small and predictable.
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no "##" in vocab
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_tiny_chat_model(save_dir: str | Path, max_position_embeddings: int = 1024,
                          seed: int = 0) -> Path:
    """The tiny tokenizer plus a 2-layer random Llama over it, saved into ``save_dir``;
    weights large enough that greedy choices are not near-ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(save_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(save_dir)
    return Path(save_dir)
