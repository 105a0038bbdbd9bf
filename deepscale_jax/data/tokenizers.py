"""Tokenizers: text <-> int32 token ids."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: every byte is a token, so ``vocab_size == 256``.

    No special tokens: documents are separated in the token stream by the newline byte
    (:attr:`separator_id`), which is ordinary text.
    """

    vocab_size: int = 256
    separator_id: int = ord("\n")

    def encode(self, text: str | bytes) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as an int32 array of shape ``[len(bytes)]``."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Returns the text of byte ids; invalid UTF-8 sequences become U+FFFD.

        Raises:
          ValueError: if an id is outside ``[0, 256)``.
        """
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"byte ids must lie in [0, {self.vocab_size}), got min={ids.min()} max={ids.max()}"
            )
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
