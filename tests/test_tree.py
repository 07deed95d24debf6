"""Token-tree helpers: shapes are validated, parent-first, and cut to valid trees."""

from __future__ import annotations

import random

import pytest

from draftwise.config import parse_speculative_config
from draftwise.errors import BadInput
from draftwise.tree import (
    TreeShape, best_first_tree, default_tree, geometric_accept, order_parent_first, path_to,
)
from draftwise.verify import children_of


def assert_valid(shape: TreeShape) -> None:
    parents = shape.parents
    assert all(-1 <= p < j for j, p in enumerate(parents)), "parents must come first"
    children_of(parents)  # the verifier's own check
    for j, p in enumerate(shape.paths):
        if len(p) > 1:
            assert shape.paths[parents[j]] == p[:-1]
        assert shape.depths[j] == len(p)


def random_paths(rng: random.Random, n: int) -> list[tuple[int, ...]]:
    """A random prefix-closed set of n paths."""
    paths: list[tuple[int, ...]] = [(0,)]
    while len(paths) < n:
        base = rng.choice(paths + [()])
        child = base + (rng.randrange(4),)
        if child not in paths and len(child) <= 5:
            paths.append(child)
    return paths


def test_order_parent_first_moves_parents_before_children():
    assert order_parent_first([[0, 0], [1], [0]]) == [(0,), (0, 0), (1,)]
    assert order_parent_first([[0], [0, 1], [0, 1, 0], [2], [0, 0]]) == [(0,), (0, 1), (0, 1, 0), (2,), (0, 0)]


@pytest.mark.parametrize("bad, reason", [
    ([[0], [0]], "distinct"), ([[]], "non-empty"), ([[0, -1], [0]], "negative"), ([[0], [1, 0]], "no parent"),
])
def test_bad_shapes_are_refused(bad, reason):
    with pytest.raises(ValueError, match=reason):
        order_parent_first(bad)
    with pytest.raises(BadInput, match=reason):
        parse_speculative_config({"method": "medusa", "tree": bad})


def test_random_shapes_are_parent_first_and_every_cut_is_a_tree():
    rng = random.Random(0)
    for _ in range(50):
        paths = random_paths(rng, rng.randrange(1, 30))
        rng.shuffle(paths)
        shape = TreeShape.from_paths(paths)
        assert sorted(shape.paths) == sorted(paths)
        for n in range(len(shape) + 1):
            assert_valid(shape.truncate(n))
        for depth in range(1, 4):
            cut = shape.truncate(max_depth=depth)
            assert_valid(cut)
            assert cut.max_depth <= depth


def test_best_first_tree_is_closed_and_ordered_by_value():
    accept = geometric_accept(depth=4, width=5)
    shape = best_first_tree(20, accept)
    assert len(shape) == 20
    assert_valid(shape)

    def value(p):
        v = 1.0
        for d, r in enumerate(p):
            v *= accept[d][r]
        return v

    values = [value(p) for p in shape.paths]
    rest = [p for p in TreeShape.from_paths(random_paths(random.Random(1), 60)).paths if p not in shape.paths
            and all(r < 5 for r in p) and len(p) <= 4]
    assert all(value(p) <= min(values) + 1e-12 for p in rest), "a better path was left out"
    assert_valid(default_tree())
    assert default_tree().paths[:2] == ((0,), (0, 0))


def test_fill_gives_each_node_its_depth_and_rank_candidate():
    shape = TreeShape.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2]])
    cands = [[10, 11, 12], [20, 21], [30]]
    tokens, parents = shape.fill(cands)
    assert tokens == [10, 11, 20, 21, 20, 30, 12]
    assert parents == [-1, -1, 0, 0, 1, 2, -1]
    assert path_to(parents, 5) == [0, 2, 5]
    assert path_to(parents, 4) == [1, 4]
    # too few candidates (small vocabulary / fewer heads): nodes and their subtrees are left out
    tokens, parents = shape.fill([[10], [20, 21]])
    assert tokens == [10, 20, 21] and parents == [-1, 0, 0]
    assert shape.ranks_needed() == [3, 2, 1]
