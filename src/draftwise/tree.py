"""Token trees for tree proposers (Medusa-style heads and the like).

A tree *shape* is a list of choice paths, as in Medusa's "choices": path (i, j) is the
node reached by taking the top-i candidate at depth 1, then the top-j candidate at depth
2 below it; every proper prefix of a path must be a path too. [[0], [0, 0], [1]] is the
top-1 token with its own top-1 child, plus the top-2 token as an alternative at depth 1.

The list order is a priority order: the engine grants a proposer a budget of nodes per
request, and a shape is cut to its first `n` nodes. Shapes are stored parent-first, so
any such cut is itself a valid tree.

What lives here: validating and ordering shapes, a default shape built best-first from
per-depth acceptance guesses, and turning per-depth candidate lists into the draft nodes
(`tokens`, `parents`) of a `Draft`, and which nodes of a draft the committed tokens spell
(`matched_path`: how drafts that did not run are scored). The tree attention mask and the
node positions are built by the engine from `parents` (`draftwise.engine.step`), not here.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

Path = tuple[int, ...]


def order_parent_first(paths: Sequence[Sequence[int]]) -> list[Path]:
    """The paths in their given order, except that a path whose parent comes later is
    preceded by it. Raises ValueError on an empty path, a negative rank, a duplicate, or a
    path whose parent is missing."""
    norm = [tuple(int(r) for r in p) for p in paths]
    present = set(norm)
    if len(present) != len(norm):
        raise ValueError("tree paths must be distinct")
    for p in norm:
        if not p:
            raise ValueError("tree paths must be non-empty (the root is implicit)")
        if any(r < 0 for r in p):
            raise ValueError(f"tree path {list(p)} has a negative rank")
        if len(p) > 1 and p[:-1] not in present:
            raise ValueError(f"tree path {list(p)} has no parent path {list(p[:-1])}")
    out: list[Path] = []
    done: set[Path] = set()
    for p in norm:
        chain = [p[:d] for d in range(1, len(p) + 1) if p[:d] not in done]  # missing ancestors, then p
        for q in chain:
            out.append(q)
            done.add(q)
    return out


@dataclass(frozen=True)
class TreeShape:
    """A validated, parent-first tree shape."""

    paths: tuple[Path, ...]

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TreeShape":
        return cls(tuple(order_parent_first(paths)))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def parents(self) -> list[int]:
        """Parent index of each node; -1 for children of the root."""
        index = {p: j for j, p in enumerate(self.paths)}
        return [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]

    @property
    def depths(self) -> list[int]:
        """Depth of each node below the root (children of the root: 1)."""
        return [len(p) for p in self.paths]

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def ranks_needed(self) -> list[int]:
        """How many candidates each depth needs: 1 + the largest rank used there."""
        need = [0] * self.max_depth
        for p in self.paths:
            need[len(p) - 1] = max(need[len(p) - 1], p[-1] + 1)
        return need

    def truncate(self, num_nodes: int | None = None, max_depth: int | None = None) -> "TreeShape":
        """The first `num_nodes` nodes no deeper than `max_depth` (still parent-first:
        dropping too deep paths drops their descendants, which are deeper still)."""
        kept = [p for p in self.paths if max_depth is None or len(p) <= max_depth]
        if num_nodes is not None:
            kept = kept[: max(0, num_nodes)]
        return TreeShape(tuple(kept))

    def fill(self, candidates: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        """Draft nodes of this shape when every node at depth d with last rank r gets the
        token `candidates[d-1][r]` (Medusa: head d-1's top-k, whatever the parent).

        Returns (tokens, parents) for a `Draft`. Nodes whose rank has no candidate (a
        vocabulary smaller than the rank) are left out together with their subtrees.
        """
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[Path, int] = {}
        for p in self.paths:
            d, r = len(p), p[-1]
            if d > len(candidates) or r >= len(candidates[d - 1]):
                continue
            parent = -1
            if d > 1:
                if p[:-1] not in index:
                    continue
                parent = index[p[:-1]]
            index[p] = len(tokens)
            tokens.append(int(candidates[d - 1][r]))
            parents.append(parent)
        return tokens, parents


def best_first_tree(num_nodes: int, accept: Sequence[Sequence[float]]) -> TreeShape:
    """The `num_nodes` paths of highest estimated acceptance, best first.

    accept[d][r]: the chance that the rank-r candidate at depth d+1 is the right token,
    given the path above it is. A path's value is the product along it; since extending
    a path or raising a rank never increases it, the best set is closed under parents,
    and popping best-first lists parents before children.
    """
    def value(p: Path) -> float:
        v = 1.0
        for d, r in enumerate(p):
            v *= accept[d][r]
        return v

    heap: list[tuple[float, int, Path]] = []
    if accept and accept[0]:
        heapq.heappush(heap, (-value((0,)), 1, (0,)))
    out: list[Path] = []
    while heap and len(out) < num_nodes:
        _, _, p = heapq.heappop(heap)
        out.append(p)
        d, r = len(p), p[-1]
        if r + 1 < len(accept[d - 1]):  # next sibling
            s = p[:-1] + (r + 1,)
            heapq.heappush(heap, (-value(s), len(s), s))
        if d < len(accept) and accept[d]:  # first child
            c = p + (0,)
            heapq.heappush(heap, (-value(c), len(c), c))
    return TreeShape.from_paths(out)


def geometric_accept(depth: int, width: int, top1: float = 0.6, decay: float = 0.85,
                     rank_decay: float = 0.35) -> list[list[float]]:
    """A prior for `best_first_tree` when nothing is measured: the top-1 candidate at
    depth d is right with chance top1 * decay^(d-1), rank r with rank_decay^r of that."""
    return [[top1 * decay**d * rank_decay**r for r in range(width)] for d in range(depth)]


def default_tree(num_nodes: int = 24, depth: int = 4, width: int = 8) -> TreeShape:
    """A small Medusa-style tree from the geometric prior."""
    return best_first_tree(num_nodes, geometric_accept(depth, width))


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """The nodes from the root's child down to `node` (inclusive), for a parent-first tree."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def matched_path(tokens: Sequence[int], parents: Sequence[int] | None, committed: Sequence[int]) -> list[int]:
    """The draft nodes greedy verification would have accepted, given the tokens the target
    then committed: the longest root path of the draft (a chain when `parents` is None)
    that spells their start."""
    path: list[int] = []
    if parents is None:
        while len(path) < min(len(tokens), len(committed)) and tokens[len(path)] == committed[len(path)]:
            path.append(len(path))
        return path
    node = -1
    while len(path) < len(committed):
        nxt = next((j for j, p in enumerate(parents) if p == node and tokens[j] == committed[len(path)]), None)
        if nxt is None:
            break
        node = nxt
        path.append(node)
    return path


def matched_length(tokens: Sequence[int], parents: Sequence[int] | None, committed: Sequence[int]) -> int:
    """How many draft tokens greedy verification would have accepted (`matched_path`'s length)."""
    return len(matched_path(tokens, parents, committed))
