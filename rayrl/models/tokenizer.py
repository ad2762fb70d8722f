"""The character-level tokenizer of the tiny default model, built locally (nothing from a hub).

One token per printable ASCII character plus newline keeps the vocabulary at ~100 ids, so a tiny
model's embedding and output layers stay small, and any ASCII text round-trips exactly:
`decode(encode(text)) == text`. Special tokens follow ChatML, like real instruct models
(SmolLM2, Qwen2), so the same chat-templated prompts work for the tiny model and real ones:

- `<|im_start|>` / `<|im_end|>` open and close a chat turn; `<|im_end|>` is the tokenizer's
  `eos_token`, the token an assistant turn ends with and generation stops on.
- `<eos>` ends a plain (non-chat) document.
- `<pad>` only fills batches; `<unk>` stands for any non-ASCII character.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, IM_START, IM_END, UNK = "<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, IM_START, IM_END, UNK)
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n",)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer with ids: special tokens first (`<pad>` = 0), then the characters."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own word, whitespace included (WordLevel would otherwise drop it).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=UNK,
        additional_special_tokens=[IM_START, EOS],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # keep " ," and friends exactly as written
        padding_side="left",                 # decoder-only batches pad on the left
    )
