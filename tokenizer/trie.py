"""Greedy longest-match encoding over a double-array trie, walked by numba-compiled loops.

Encoding rule (BlinkDL's `TRIE_TOKENIZER`, the Eagle/Finch paper's "greedy matching"): at each
position take the longest vocab entry that is a prefix of the remaining bytes. Every single
byte is an entry, so a match always exists and the output has at most one id per byte.

Trie layout (Aoe 1989, "An efficient digital search algorithm by using a double-array
structure"): node slots s; the child of s on byte c sits at slot t = base[s] + c and is real
iff check[t] == s. The root is slot 0; leaves have base 0, which cannot hit a slot whose
check is the leaf. value[t] is the token id ending at t (0 if none). The World vocab gives
116,078 trie nodes.

`encode_plain` is the plain reference (a dict of entries, longest length first); the
compiled loops are tested against it and against the `rwkv` package.
"""

from __future__ import annotations

import numba
import numpy as np

_FREE = -1


@numba.njit(cache=True, nogil=True)
def _build_trie(blob, offsets, ids):  # pragma: no cover - compiled
    """Trie from entries sorted by bytes: returns (n_nodes, first_child, next_sibling, byte, value).

    Nodes are numbered in preorder; children are linked in increasing byte order.
    """
    n_tok = offsets.shape[0] - 1
    cap = blob.shape[0] + 1
    first_child = np.full(cap, -1, np.int32)
    last_child = np.full(cap, -1, np.int32)
    next_sibling = np.full(cap, -1, np.int32)
    byte = np.zeros(cap, np.int32)
    value = np.zeros(cap, np.int32)
    path = np.zeros(1024, np.int32)  # path[d] = node at depth d of the previous entry
    prev_len = 0
    n = 1
    for k in range(n_tok):
        a, b = offsets[k], offsets[k + 1]
        length = b - a
        lcp = 0
        if k > 0:
            pa = offsets[k - 1]
            while lcp < length and lcp < prev_len and blob[a + lcp] == blob[pa + lcp]:
                lcp += 1
        for d in range(lcp, length):
            parent = path[d]
            node = n
            n += 1
            byte[node] = blob[a + d]
            if first_child[parent] < 0:
                first_child[parent] = node
            else:
                next_sibling[last_child[parent]] = node
            last_child[parent] = node
            path[d + 1] = node
        value[path[length]] = ids[k]
        prev_len = length
    return n, first_child, next_sibling, byte, value


@numba.njit(cache=True, nogil=True)
def _build_double_array(n, first_child, next_sibling, byte, node_value):  # pragma: no cover - compiled
    """Place the trie into base/check/value arrays (first-fit over free slots)."""
    size = 2 * n + 512
    base = np.zeros(size, np.int32)
    check = np.full(size, _FREE, np.int32)
    value = np.zeros(size, np.int32)
    slot = np.zeros(n, np.int32)
    check[0] = -2  # the root occupies slot 0
    kids = np.zeros(256, np.int32)
    first_free = 1
    top = 1
    for u in range(n):  # preorder: a node's slot is fixed before it is visited
        m = 0
        c = first_child[u]
        while c >= 0:
            kids[m] = c
            m += 1
            c = next_sibling[c]
        if m == 0:
            continue
        while check[first_free] != _FREE:
            first_free += 1
        p = first_free
        while True:
            b = p - byte[kids[0]]
            ok = b >= 1
            if ok:
                for i in range(m):
                    if check[b + byte[kids[i]]] != _FREE:
                        ok = False
                        break
            if ok:
                break
            p += 1
            while check[p] != _FREE:
                p += 1
        su = slot[u]
        base[su] = b
        for i in range(m):
            t = b + byte[kids[i]]
            check[t] = su
            slot[kids[i]] = t
            value[t] = node_value[kids[i]]
            if t + 1 > top:
                top = t + 1
    size = top + 256  # leaves have base 0, so every base[s] + c stays in range
    return base[:size].copy(), check[:size].copy(), value[:size].copy()


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _encode_into(data, start, end, base, check, value, out, k):  # pragma: no cover - compiled
    """Greedy longest match of data[start:end] written to out[k:]; returns the new k."""
    i = start
    while i < end:
        s = 0
        j = i
        best_j = i + 1
        best_v = 0
        while j < end:
            t = base[s] + data[j]
            if check[t] != s:
                break
            s = t
            j += 1
            v = value[t]
            if v != 0:
                best_v = v
                best_j = j
        out[k] = best_v
        k += 1
        i = best_j
    return k


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _encode_docs(data, doc_offsets, base, check, value, out, tok_offsets):  # pragma: no cover - compiled
    """Encode documents data[doc_offsets[d]:doc_offsets[d+1]] one after another into out.

    tok_offsets[d]..tok_offsets[d+1] receives the token range of document d; returns the total.
    """
    k = 0
    tok_offsets[0] = 0
    for d in range(doc_offsets.shape[0] - 1):
        k = _encode_into(data, doc_offsets[d], doc_offsets[d + 1], base, check, value, out, k)
        tok_offsets[d + 1] = k
    return k


class DoubleArrayTrie:
    """The vocab as a double-array trie plus the compiled greedy encoder over it."""

    def __init__(self, tokens: list[bytes]):
        order = sorted(range(1, len(tokens)), key=tokens.__getitem__)
        blob = np.frombuffer(b"".join(tokens[i] for i in order), np.uint8)
        offsets = np.zeros(len(order) + 1, np.int64)
        np.cumsum([len(tokens[i]) for i in order], out=offsets[1:])
        ids = np.asarray(order, np.int32)
        n, first_child, next_sibling, byte, node_value = _build_trie(blob, offsets, ids)
        self.n_nodes = int(n)
        self.base, self.check, self.value = _build_double_array(
            n, first_child, next_sibling, byte, node_value
        )
        dtype = np.uint16 if len(tokens) <= 65536 else np.int32
        self.out_dtype = np.dtype(dtype)

    def encode_array(self, data: np.ndarray) -> np.ndarray:
        """Token ids of a uint8 array, as a fresh array of `out_dtype`."""
        out = np.empty(data.shape[0], self.out_dtype)
        k = _encode_into(data, 0, data.shape[0], self.base, self.check, self.value, out, 0)
        return out[:k].copy()

    def encode_docs(self, data: np.ndarray, doc_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encode concatenated documents; returns (ids, token offsets per document). Releases the GIL."""
        out = np.empty(data.shape[0], self.out_dtype)
        tok_offsets = np.empty(doc_offsets.shape[0], np.int64)
        k = _encode_docs(data, doc_offsets, self.base, self.check, self.value, out, tok_offsets)
        return out[:k], tok_offsets


def encode_plain(entries: dict[bytes, int], data: bytes, max_len: int = 128) -> list[int]:
    """Plain reference: at each position the longest entry of `entries` that prefixes the rest."""
    ids = []
    i = 0
    while i < len(data):
        for n in range(min(max_len, len(data) - i), 0, -1):
            idx = entries.get(data[i : i + n])
            if idx is not None:
                ids.append(idx)
                i += n
                break
        else:
            raise ValueError(f"byte {data[i]:#04x} at offset {i} has no vocab entry")
    return ids
