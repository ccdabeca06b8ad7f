"""A darts-clone double-array trie over byte strings, as SentencePiece and ``tokenizers`` read it.

``tokenizers.normalizers.Precompiled`` (and SentencePiece's ``precompiled_charsmap``) look characters up
in this layout; :mod:`peftlab.convert.e5` builds its normalisation map with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def double_array(keys: dict[bytes, int]) -> np.ndarray:
    """The units of a darts-clone double array mapping each non-empty byte string to its value.

    Args:
        keys: byte strings (no NUL byte: label 0 marks a leaf) to values below 2**31.

    Returns:
        ``uint32`` units; unit 0 is the root.

    Raises:
        ValueError: the trie needs offsets beyond what the unscaled encoding holds (2**21).
    """
    # Byte trie as nested dicts; label 0 marks the leaf (a key ends here).
    root: dict[int, Any] = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[0] = value

    # darts-clone layout: a node at `pos` stores offset = pos ^ base, its child
    # with label c lives at base ^ c and stores c (bit 8: "has a leaf child");
    # the leaf (label 0) stores value | 1 << 31. Children of one node share the
    # 256-aligned block of `base`, so we search block by block for a low byte
    # whose XOR with every label lands on free slots. Distinct bases guarantee a
    # lookup never matches another node's child.
    used = np.zeros(1 << 12, dtype=bool)
    used[0] = True  # the root's own unit
    units = np.zeros(1 << 12, dtype=np.uint32)
    bases: set[int] = set()
    all_low = np.arange(256)
    queue: list[tuple[int, dict[int, Any]]] = [(0, root)]
    block = 0
    for pos, node in queue:  # BFS: the list grows while we iterate
        labels = np.array(sorted(node), dtype=np.int64)
        while used[block * 256 : (block + 1) * 256].all():
            block += 1  # skip full blocks once and for all
        k = block
        while True:
            if (k + 1) * 256 > used.size:
                used = np.concatenate([used, np.zeros_like(used)])
                units = np.concatenate([units, np.zeros_like(units)])
            free = ~used[k * 256 : (k + 1) * 256]
            ok = free[np.bitwise_xor.outer(all_low, labels)].all(axis=1)
            cands = [k * 256 + int(b) for b in np.flatnonzero(ok) if k * 256 + int(b) not in bases]
            if cands:
                base = cands[0]
                break
            k += 1
        offset = pos ^ base
        if offset >= 1 << 21:  # would need darts' scaled-offset encoding
            raise ValueError(f"node offset {offset} needs darts' scaled-offset encoding (at most {(1 << 21) - 1})")
        bases.add(base)
        units[pos] |= np.uint32(offset << 10)
        for c in labels.tolist():
            child = base ^ c
            used[child] = True
            if c == 0:
                units[pos] |= np.uint32(1 << 8)
                units[child] = np.uint32(node[0] | 1 << 31)
            else:
                units[child] = np.uint32(c)
                queue.append((child, node[c]))
    # Lookups read base ^ c for any byte c, so keep every touched block whole.
    n_units = max(max(bases) | 0xFF, int(np.flatnonzero(used).max())) + 1
    return units[:n_units]
