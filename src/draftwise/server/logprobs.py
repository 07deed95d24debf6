"""Log-probabilities in OpenAI's two shapes: the legacy completions object and chat's.

The numbers come from the engine (`sampling.TokenLogprob`: the target model's own
distribution at each emitted position, raw logits, as vLLM reports by default); this
module only names the tokens and lays them out.

A token is named by its text, except a token that is part of a multi-byte character
(its text alone would be U+FFFD, the same for many tokens): it is named `bytes:\\xNN...`
by its raw bytes, as OpenAI's API does, so `top_logprobs` keys do not collide. Chat's
`bytes` are always the token's raw bytes.
"""

from __future__ import annotations

import re

from draftwise.sampling import TokenLogprob

SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: stand-in character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


BYTE_LEVEL = byte_level_table()


def token_bytes(tokenizer, token: int) -> bytes:
    """The raw bytes a token stands for (byte-level BPE, SentencePiece, or its decoded text)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str) and piece:
        if (m := SENTENCEPIECE_BYTE.fullmatch(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        if all(c in BYTE_LEVEL for c in piece):
            return bytes(BYTE_LEVEL[c] for c in piece)
        if "\u2581" in piece:
            return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token]).encode("utf-8")


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def raw(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = token_bytes(self.tokenizer, token)
        return self._bytes[token]

    def text(self, token: int) -> str:
        if token not in self._text:
            text = self.tokenizer.decode([token])
            if "\ufffd" in text and b"\xef\xbf\xbd" not in self.raw(token):  # part of a character
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in self.raw(token))
            self._text[token] = text
        return self._text[token]

    def completion(self, items: list[TokenLogprob], offset: int) -> dict:
        """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; offsets count
        characters from the start of the choice's text, beginning at `offset`."""
        tokens = [self.text(it.token) for it in items]
        offsets = []
        for it in items:
            offsets.append(offset)
            offset += len(self.tokenizer.decode([it.token]))
        tops = [{self.text(i): lp for i, lp in [*it.top, (it.token, it.logprob)]} for it in items]
        return {"tokens": tokens, "token_logprobs": [it.logprob for it in items], "top_logprobs": tops,
                "text_offset": offsets}

    def chat(self, items: list[TokenLogprob]) -> dict:
        """`{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}`."""
        return {"content": [dict(self._entry(it.token, it.logprob),
                                 top_logprobs=[self._entry(i, lp) for i, lp in it.top]) for it in items],
                "refusal": None}

    def _entry(self, token: int, logprob: float) -> dict:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.raw(token))}
