"""Union-find over array axes, where an axis may be a product of factors.

Every axis of every value in a traced function is a *node*. Two nodes are *united* when one channel
of the first is one channel of the second (an add of a residual, the contraction of a matmul, a
bias broadcast onto its layer's output). A node can also be a *product* of factor nodes, outer to
inner: a reshape of ``(d, heads * dim)`` into ``(d, heads, dim)`` makes the kernel's output axis
the product ``heads x dim``. Uniting two products refines both to their common factorisation, so a
fused kernel and the per-head values it feeds end up sharing a ``heads`` class and a ``dim`` class.

A class also carries *reasons* (it cannot be removed: it reaches an input, an output, an op
without a rule) and *hazards* (it can be removed but something changes, e.g. a norm reduces over
it). Both are plain strings collected on the leaf atoms of a class.
"""

from __future__ import annotations

import math


class Axes:
    """The union-find: ``new(size)``, ``product(nodes)``, ``unite(a, b)``, ``leaves(n)``."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.children: dict[int, list[int]] = {}
        self.reasons: dict[int, dict[str, None]] = {}
        self.hazards: dict[int, dict[str, None]] = {}
        self.hidden: set[int] = set()

    def new(self, size: int) -> int:
        """A fresh atom of ``size`` channels."""
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, n: int) -> int:
        root = n
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[n] != root:
            self.parent[n], n = root, self.parent[n]
        return root

    def product(self, nodes: list[int]) -> int | None:
        """A node that is the product of ``nodes`` (outer to inner); size-1 factors are dropped."""
        nodes = [n for n in nodes if self.size[n] > 1]
        if not nodes:
            return None
        if len(nodes) == 1:
            return nodes[0]
        n = self.new(math.prod(self.size[m] for m in nodes))
        self.children[n] = list(nodes)
        return n

    def leaves(self, n: int) -> list[int]:
        """The atoms of ``n``, outer to inner, each a class root."""
        r = self.find(n)
        if r in self.children:
            return [leaf for c in self.children[r] for leaf in self.leaves(c)]
        return [r]

    def tag(self, n: int | None, reason: str, *, hazard: bool = False) -> None:
        """Marks every atom of ``n`` as not removable (or, with ``hazard``, as hazardous)."""
        if n is None or self.size[n] <= 1:
            return
        store = self.hazards if hazard else self.reasons
        for leaf in self.leaves(n):
            store.setdefault(leaf, {})[reason] = None

    def hide(self, n: int) -> None:
        """Marks ``n`` as not a channel axis at all (a convolution kernel's spatial axis)."""
        for leaf in self.leaves(n):
            self.hidden.add(leaf)

    def _link(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.children and ra not in self.children:
            self.children[ra] = self.children[rb]
        for store in (self.reasons, self.hazards):
            if rb in store:
                store.setdefault(ra, {}).update(store.pop(rb))
        if rb in self.hidden:
            self.hidden.add(ra)

    def _split(self, leaf: int, sizes: list[int]) -> None:
        """Refines the atom ``leaf`` into fresh atoms of ``sizes`` (outer to inner)."""
        kids = [self.new(s) for s in sizes]
        for k in kids:
            for store in (self.reasons, self.hazards):
                if leaf in store:
                    store[k] = dict(store[leaf])
            if leaf in self.hidden:
                self.hidden.add(k)
        self.children[leaf] = kids

    def _refine(self, n: int, bounds: list[int]) -> None:
        """Splits the atoms of ``n`` at the inner-size boundaries ``bounds`` (ascending)."""
        inner = self.size[self.find(n)]
        for leaf in self.leaves(n):
            outer, inner = inner, inner // self.size[leaf]
            cuts = [b for b in bounds if inner <= b <= outer]
            if len(cuts) > 2:
                self._split(leaf, [cuts[i + 1] // cuts[i] for i in reversed(range(len(cuts) - 1))])

    def unite(self, a: int | None, b: int | None, why: str = "") -> bool:
        """Unites two nodes of equal size; returns False (and tags both with ``why``) if their
        factorisations have no common refinement (e.g. a reshape ``(6, 4) -> (4, 6)``)."""
        if a is None or b is None:
            return True
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            self.tag(a, why or "axes of different sizes meet")
            self.tag(b, why or "axes of different sizes meet")
            return False
        la, lb = self.leaves(ra), self.leaves(rb)
        if len(la) == 1 and len(lb) == 1:
            self._link(ra, rb)
            return True
        bounds = sorted(
            set(_bounds([self.size[x] for x in la]) + _bounds([self.size[x] for x in lb]))
        )
        bounds.append(self.size[ra])
        if any(hi % lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)):
            reason = why or "axes with incompatible factorisations meet"
            self.tag(ra, reason)
            self.tag(rb, reason)
            return False
        self._refine(ra, bounds)
        self._refine(rb, bounds)
        for x, y in zip(self.leaves(ra), self.leaves(rb), strict=True):
            self._link(x, y)
        self._link(ra, rb)
        return True


def _bounds(sizes: list[int]) -> list[int]:
    """Inner sizes below each factor: ``(a, b, c) -> [b * c, c, 1]``."""
    out, acc = [], 1
    for s in reversed(sizes):
        out.append(acc)
        acc *= s
    return out
