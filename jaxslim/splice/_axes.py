"""Union-find over array axes, where an axis may be a product of factors.

Every axis of every value in a traced function is a *node*. Two nodes are *united* when one channel
of the first is one channel of the second (an add of a residual, the contraction of a matmul, a
bias broadcast onto its layer's output). A node can also be a *product* of factor nodes, outer to
inner: a reshape of ``(d, heads * dim)`` into ``(d, heads, dim)`` makes the kernel's output axis
the product ``heads x dim``. Uniting two products refines both to their common factorisation, so a
fused kernel and the per-head values it feeds end up sharing a ``heads`` class and a ``dim`` class.

A node can also be a *concatenation* of segment nodes (``segments``): concatenating operands of
widths ``a`` and ``b`` along a channel axis gives an axis whose first ``a`` channels are the first
operand's and the next ``b`` the second's. Uniting two concatenations cuts both at the union of
their segment boundaries (always possible), so the next layer's input rows end up segmented too,
one segment per operand. A concatenation that meets a product (a reshape merging it with another
axis) is not mapped: both are tagged.

A class also carries *reasons* (it cannot be removed: it reaches an input, an output, an op
without a rule) and *hazards* (it can be removed but something changes, e.g. a norm reduces over
it). Both are plain strings collected on the leaf atoms of a class. *Roles* record how a class
meets matmuls of two activations (attention's ``q @ k`` and ``probs @ v``): ``role -> {dot ids}``
with ``role`` one of ``"contracted"``, ``"free"``, ``"batch"`` (see :meth:`Axes.within_head`).
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
        self.segments: dict[int, list[int]] = {}
        self.roles: dict[int, dict[str, set[int]]] = {}

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

    def concat(self, nodes: list[int]) -> int:
        """A node that is the concatenation of ``nodes`` (in order); empty segments are dropped."""
        nodes = [n for n in nodes if self.size[n] > 0]
        if len(nodes) == 1:
            return nodes[0]
        n = self.new(sum(self.size[m] for m in nodes))
        self.segments[n] = list(nodes)
        return n

    def copy(self, n: int, memo: dict[int, int]) -> int:
        """A fresh node with the structure (products, concatenations) and the reasons, hazards
        and roles of ``n``, united with nothing; ``memo`` maps the classes already copied, so
        classes shared within one value stay shared in its copy."""
        r = self.find(n)
        if r in memo:
            return memo[r]
        kids = self.children.get(r)
        segs = self.segments.get(r)
        c = self.new(self.size[r])
        if kids:
            self.children[c] = [self.copy(k, memo) for k in kids]
        elif segs:
            self.segments[c] = [self.copy(k, memo) for k in segs]
        else:
            self._inherit(r, c)
        if r in self.hidden:
            self.hidden.add(c)
        memo[r] = c
        return c

    def pieces(self, n: int) -> list[tuple[int, int]] | None:
        """``(atom, offset)`` of the segments of ``n`` (nested concatenations flattened), or None
        when some segment (or ``n``) is a product."""
        r = self.find(n)
        if r in self.children:
            return None
        if r not in self.segments:
            return [(r, 0)]
        out, off = [], 0
        for c in self.segments[r]:
            sub = self.pieces(c)
            if sub is None:
                return None
            out += [(a, off + o) for a, o in sub]
            off += self.size[self.find(c)]
        return out

    def atoms(self, n: int) -> list[int]:
        """Every atom under ``n``, through products and concatenations."""
        r = self.find(n)
        kids = self.children.get(r) or self.segments.get(r)
        if kids:
            return [a for c in kids for a in self.atoms(c)]
        return [r]

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
        for leaf in self.atoms(n):
            store.setdefault(leaf, {})[reason] = None

    def hide(self, n: int) -> None:
        """Marks ``n`` as not a channel axis at all (a convolution kernel's spatial axis)."""
        for leaf in self.atoms(n):
            self.hidden.add(leaf)

    def _link(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.children and ra not in self.children:
            self.children[ra] = self.children[rb]
        if rb in self.segments and ra not in self.segments:
            self.segments[ra] = self.segments[rb]
        for store in (self.reasons, self.hazards):
            if rb in store:
                store.setdefault(ra, {}).update(store.pop(rb))
        if rb in self.roles:
            mine = self.roles.setdefault(ra, {})
            for role, ids in self.roles.pop(rb).items():
                mine.setdefault(role, set()).update(ids)
        if rb in self.hidden:
            self.hidden.add(ra)

    def _split(self, leaf: int, sizes: list[int]) -> None:
        """Refines the atom ``leaf`` into fresh atoms of ``sizes`` (outer to inner)."""
        kids = [self.new(s) for s in sizes]
        for k in kids:
            self._inherit(leaf, k)
            if leaf in self.hidden:
                self.hidden.add(k)
        self.children[leaf] = kids

    def _inherit(self, src: int, dst: int) -> None:
        """Copies the reasons, hazards and roles of atom ``src`` to a new atom ``dst``."""
        for store in (self.reasons, self.hazards):
            if src in store:
                store[dst] = dict(store[src])
        if src in self.roles:
            self.roles[dst] = {r: set(ids) for r, ids in self.roles[src].items()}

    def mark(self, n: int | None, role: str, dot: int) -> None:
        """Records that ``n`` is a ``role`` axis of the activation-activation matmul ``dot``."""
        if n is None or self.size[n] <= 1:
            return
        for leaf in self.atoms(n):
            self.roles.setdefault(leaf, {}).setdefault(role, set()).add(dot)

    def within_head(self, root: int) -> bool:
        """Whether the class ``root`` is a within-head dimension of attention: contracted by a
        matmul of two activations (``q @ k``: head_dim), or a free axis of exactly one such
        matmul (``probs @ v``: the value head_dim), and never one's batch axis (heads). Query
        heads grouped under a key/value head (``(b, kv, g, t, s)``) are free in both ``q @ k``
        and ``probs @ v``, so they are not within-head."""
        roles = self.roles.get(root, {})
        if roles.get("batch"):
            return False
        if roles.get("contracted"):
            return True
        return len(roles.get("free", ())) == 1

    def probe_size(self, n: int, grow: dict[int, int]) -> int:
        """The size of node ``n`` when each class ``root`` in ``grow`` has ``grow[root]`` more
        channels: products multiply, concatenations add."""
        r = self.find(n)
        if r in self.children:
            return math.prod(self.probe_size(c, grow) for c in self.children[r])
        if r in self.segments:
            return sum(self.probe_size(c, grow) for c in self.segments[r])
        return self.size[r] + grow.get(r, 0)

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
        if self._segmented(ra) or self._segmented(rb):
            return self._unite_segments(ra, rb, why)
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

    def _segmented(self, r: int) -> bool:
        return r in self.segments or any(x in self.segments for x in self.leaves(r))

    def _cut(self, r: int, cuts: set[int]) -> bool:
        """Splits the segment atoms of ``r`` at the offsets ``cuts``; True if anything changed."""
        changed = False
        for atom, off in self.pieces(r) or ():
            end = off + self.size[atom]
            inner = sorted(c - off for c in cuts if off < c < end)
            if inner and atom not in self.segments:
                bounds = [0, *inner, self.size[atom]]
                kids = [self.new(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
                for k in kids:
                    self._inherit(atom, k)
                    if atom in self.hidden:
                        self.hidden.add(k)
                self.segments[atom] = kids
                changed = True
        return changed

    def _unite_segments(self, ra: int, rb: int, why: str) -> bool:
        """Unites two equal-size nodes of which one is a concatenation, segment by segment."""
        if self.pieces(ra) is None or self.pieces(rb) is None:
            reason = why or "a concatenated axis meets a reshape that merges it with another axis"
            self.tag(ra, reason)
            self.tag(rb, reason)
            return False
        while True:
            cuts = {o for _, o in self.pieces(ra)} | {o for _, o in self.pieces(rb)}
            changed = self._cut(ra, cuts)
            changed = self._cut(rb, cuts) or changed
            if not changed:
                break
        for (x, _), (y, _) in zip(self.pieces(ra), self.pieces(rb), strict=True):
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
