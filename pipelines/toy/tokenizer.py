"""A CLIPTokenizer for the toy world: every world word is one token, anything else spells out.

Real CLIP tokenizers are byte-level BPE with ~49k merges learned from web text.
The toy world has 26 words (`world.vocabulary()`), so instead of learning
merges we write them: for each word, the merges that glue its characters
together left to right until the word (with CLIP's end-of-word suffix
"</w>") is a single token. Single characters stay in the vocabulary, so a
word the world never uses still tokenizes (into characters) instead of
becoming <unk>.

Merges are added word by word, each appended after all earlier ones. BPE
always applies the highest-priority merge it can, so appending a merge never
changes how an earlier word tokenizes; each word only gets the merges its
greedy tokenization under the list so far still lacks.
"""
from __future__ import annotations

import string

from transformers import CLIPTokenizer

from .world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
# Printable ASCII without whitespace: these map to themselves under CLIP's byte-level pre-tokenizer.
CHARACTERS = tuple(string.printable[:94])
# The longest caption (two large objects at "bottom right"/"bottom left" positions, a one-word
# background) is 21 words, so 23 tokens with BOS/EOS; 24 leaves one spare position.
MAX_LENGTH = 24


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE: repeatedly merge the adjacent pair with the lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges (in priority order) under which each of `words` is a single token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + SUFFIX], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_merges(symbols, ranks)
    return merges


def build_tokenizer(words: list[str] | None = None, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """CLIPTokenizer (BOS=0, EOS=pad=1) with characters plus one token per word of `words`
    (default: the toy world's vocabulary)."""
    words = list(words or vocabulary())
    vocab = {BOS: 0, EOS: 1}
    for c in CHARACTERS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + SUFFIX, len(vocab))
    merges = word_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)
