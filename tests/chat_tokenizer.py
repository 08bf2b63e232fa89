"""A tiny word-level tokenizer carrying a chat template (built here; nothing is downloaded).

Ids fit ``tiny_models.VOCAB`` (40) with pad 0, BOS 1, EOS 2 as ``tiny_config`` sets them.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "<s>", "</s>", "[UNK]"]
MARKERS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ("hi there how are you fine thanks tell me a story once upon time the end is near "
         "what why yes no please help red blue green one two three four five").split()
# Turns as "<|role|> content <|end|>", BOS in front, "<|assistant|>" as the generation prompt.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
            "<|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")

# A conversation before a response: system, user, assistant, user.
CHAT_TURNS = [{"role": "system", "content": "please help"},
              {"role": "user", "content": "tell me a story"},
              {"role": "assistant", "content": "once upon a time"},
              {"role": "user", "content": "why"}]


def chat_tokenizer(template: str | None = TEMPLATE, adds_bos: bool = False
                   ) -> PreTrainedTokenizerFast:
    """The tokenizer; ``adds_bos``: its post-processor puts BOS in front (as Llama's does)."""
    vocab = {w: i for i, w in enumerate(SPECIAL + MARKERS + WORDS)}
    assert len(vocab) <= 40
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
            ("<s>", vocab["<s>"])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="<s>",
                                  eos_token="</s>", unk_token="[UNK]")
    out.chat_template = template
    return out
