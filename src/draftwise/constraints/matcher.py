"""One request's grammar state: what it allows next, what it forces, advance and rollback.

Terms:
- allowed tokens of a state: the tokens the grammar accepts next (`fill` writes them as a
  bitmask row: bit t of the row is token t; `unpack` turns rows into a bool mask).
- forced tokens of a state: the continuation the grammar leaves no choice about (a
  schema's next key with its quotes and colon, a closing brace), as tokens (`forced`).
- stopped: the grammar is complete and allows nothing more; the request ends there.

Special tokens (an added token such as Qwen's `<tool_call>`): llguidance's mask may allow
one whose text a grammar literal spells while the matcher then refuses to take it (seen with
llguidance 1.9.1 at the start of a literal). `fill` and `forced` therefore keep a special
token only where the matcher takes it, so the mask, the forced tokens and `advance` agree.

The matcher only ever holds committed tokens between engine steps: drafting walks along a
draft with `push` and returns with `pop` (llguidance's rollback), so a rejected draft
leaves no trace (`tests/test_constraints.py` checks that property over random drafts).
A stop token pushed where the grammar has already stopped is taken by llguidance 1.9.1
without entering its history, and its rollback then undoes one real token too many (a
committed one, where the draft stopped the grammar part-way): such a push is counted here
and not passed on, so `pop` rolls back only what llguidance took.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from draftwise.constraints.compile import CompiledGrammar

_BITS = torch.arange(32, dtype=torch.int32)


class Matcher:
    """The grammar state of one request (see the module docstring)."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self._m = grammar.matcher()
        self.vocab_size = grammar.vocab_size
        self.words = (grammar.vocab_size + 31) // 32
        self._special = torch.tensor(grammar.special_ids, dtype=torch.int64)
        self._taken: list[bool] = []  # per push not yet popped: whether llguidance took it (module docstring)

    # --- committed state ------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return bool(self._m.is_stopped())

    def takes(self, token: int) -> bool:
        """Would the grammar take `token` now? (False only at a dead end: see engine.py.)"""
        return bool(self._m.validate_tokens([token]))

    def advance(self, token: int) -> None:
        """Commit one token the grammar allows (the verifier only emits allowed tokens)."""
        if not self._m.consume_token(token):
            raise RuntimeError(f"the grammar refused committed token {token}: {self._m.get_error()}")

    # --- walking a draft --------------------------------------------------------------

    def new_mask(self, rows: int) -> Tensor:
        """An empty bitmask of `rows` rows (int32 [rows, words])."""
        return torch.zeros(rows, self.words, dtype=torch.int32)

    def fill(self, mask: Tensor, row: int) -> None:
        """Write the current state's allowed tokens into `mask[row]`."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._m, mask, row)
        if self._special.numel():
            self._drop_refused_special(mask, row)

    def _drop_refused_special(self, mask: Tensor, row: int) -> None:
        """Clear the bits of special tokens the matcher would not take (module docstring)."""
        ids = self._special
        on = ((mask[row, ids >> 5] >> (ids & 31).to(torch.int32)) & 1).bool()
        for t in ids[on].tolist():
            if not self._m.validate_tokens([t]):
                word = int(mask[row, t >> 5]) & 0xFFFFFFFF & ~(1 << (t & 31))
                mask[row, t >> 5] = word - (1 << 32) if word >= 1 << 31 else word

    @staticmethod
    def allows(mask: Tensor, row: int, token: int) -> bool:
        """Is `token` allowed in the state whose mask is `mask[row]`?"""
        if token < 0 or (token >> 5) >= mask.shape[1]:
            return False
        return bool((int(mask[row, token >> 5]) >> (token & 31)) & 1)

    def forced(self) -> list[int]:
        """The tokens the current state forces (none when stopped)."""
        if self.stopped:
            return []
        tokens = list(self._m.compute_ff_tokens())
        return tokens[: int(self._m.validate_tokens(tokens))] if tokens else tokens

    def push(self, token: int) -> None:
        """Advance along a draft token that `allows` said is allowed."""
        if self.stopped:  # only a stop token is allowed here, and it changes nothing
            self._taken.append(False)
            return
        if not self._m.consume_token(token):
            raise RuntimeError(f"the grammar refused draft token {token}: {self._m.get_error()}")
        self._taken.append(True)

    def pop(self, n: int) -> None:
        """Undo the last n pushes."""
        if n <= 0:
            return
        undone, self._taken = self._taken[-n:], self._taken[:-n]
        real = sum(undone)
        if real and not self._m.rollback(real):
            raise RuntimeError(f"grammar rollback of {n} tokens failed: {self._m.get_error()}")

    def unpack(self, mask: Tensor) -> Tensor:
        """Bitmask rows [rows, words] -> bool [rows, vocab_size]."""
        bits = (mask.unsqueeze(-1) >> _BITS) & 1  # [rows, words, 32]
        return bits.bool().reshape(mask.shape[0], -1)[:, : self.vocab_size]

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Would the grammar take all of `tokens` from the current state? (State unchanged.)
        Where it stops part-way, what follows must be tokens its stopped state allows (a
        stop token: `fill` allows it there, llguidance's validation does not)."""
        tokens = list(tokens)
        n = int(self._m.validate_tokens(tokens))
        if n == len(tokens):
            return True
        for t in tokens[:n]:
            self.push(t)
        try:
            if not self.stopped:
                return False
            mask = self.new_mask(1)
            self.fill(mask, 0)
            return all(self.allows(mask, 0, t) for t in tokens[n:])
        finally:
            self.pop(n)

    def allowed_after(self, tokens: Sequence[int]) -> Tensor:
        """Bool mask [len(tokens)+1, vocab] of the states along `tokens` (rows 0..n: after
        0..n of them), leaving the state as it was. Tests and tools; the engine walks drafts
        with `fill` / `push` / `pop` directly."""
        mask = self.new_mask(len(tokens) + 1)
        for j, t in enumerate(tokens):
            self.fill(mask, j)
            self.push(t)
        self.fill(mask, len(tokens))
        self.pop(len(tokens))
        return self.unpack(mask)
