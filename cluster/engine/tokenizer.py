"""The checkpoint's tokenizer (`tokenizer.json`, read with the `tokenizers` library)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, model_dir: str | Path, fallback_eos: tuple[int, ...] = ()) -> None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}: pass token ids instead of text")
        self._tok = HFTokenizer.from_file(str(path))
        self.eos_token_ids = _eos_ids(Path(model_dir)) or fallback_eos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_step(self, stream, token_id: int) -> str | None:
        """One step of a tokenizers.decoders.DecodeStream over this tokenizer."""
        return stream.step(self._tok, token_id)


def check_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    """A prompt's ids, or ValueError naming the problem: empty, or ids outside the vocabulary."""
    if not ids:
        raise ValueError("prompt is empty")
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def _eos_ids(model_dir: Path) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
