"""Greedy longest-match encoding over a double-array trie, walked by numba-compiled loops.

Encoding rule (BlinkDL's `TRIE_TOKENIZER`, the Eagle/Finch paper's "greedy matching"): at each
position take the longest vocab entry that is a prefix of the remaining bytes. Every single
byte is an entry, so a match always exists and the output has at most one id per byte.

Trie layout: a double array (Aoe 1989, "An efficient digital search algorithm by using a
double-array structure") in which every inner node has its own base, so the child of slot s
on byte c sits at t = base[s] + c and is real iff label[t] == c (with unique bases no other
parent can own that slot). One uint32 per slot holds `label | base << 8`; leaves have base
0 and slots 0..255 never carry their own index as label, so a walk from a leaf stops at
once. value[t] is the id of the entry ending at t (0 if none). The World vocab gives 116,078
trie nodes in 121,334 slots: 485 KB of walk table plus 243 KB of ids, which fits in L2.

What was measured while choosing (this shared 2-core AMD EPYC, CPU time, best of 7, the
kernel alone on Python stdlib code / multilingual sample lines / package docs, MB/s):
three int32 arrays base/check/value 154/188/157; one packed int64 per slot
(check|base|value) 190/241/218, with a 65,536-entry table for the first two bytes
184/242/213; the label layout above 206/259/234, with the root step unrolled and a stop at
leaves 204/279/256 (kept); separate base and label arrays 182/219/199, breadth-first
placement (packed layout) 175/230/201. Branch-free steps were slower: one stream 162/227/182, and
walking 2-4 chunks of the text interleaved (speculative starts, re-synchronised at the
first shared token boundary) 108-151. A fully predictable text (" the" repeated) runs at
10.5 ns per token against 18-19 ns for real text: about half the time is the mispredicted
exit at the end of each token, the rest the chain of dependent table loads.
pyrwkv-tokenizer (Rust) measured the same way: 55-90 MB/s, including building its list.

Second round (ns per token, kernel alone, best of 7 with the variants taking turns, on the
benchmark's Python stdlib code / multilingual lines / 12 MB mix): int64 indices 18.0/10.2/13.9;
uint64 indices (no wraparound code) 17.3/9.5/13.2; plus no end check for tokens starting
MAX_TOKEN_BYTES before the end 17.0/9.5/13.0 (kept). Within noise of the kept walk: a terminal
bit in the table word instead of a value load per step, ids looked up once per token
(17.3/9.6/12.8 vs 17.5/9.7/12.9); the 65,536-entry table over the first two bytes (longest
match within them and the node to go on from, 384 KB, built in 2 ms; 16.3/9.6/12.8 vs
16.8/9.6/12.9); no leaf check in the unchecked loop. Slower: breadth-first placement
19.7/10.3/14.5 and placement by subtree size 19.6/10.6/14.7 (preorder keeps a path's slots
close); a memo of the next 4 or 8 bytes -> (id, length) for tokens decided within them
(60-86% hits, 13.0-15.1 on the mix: the hit test mispredicts and the memo misses too); a
branch-free automaton (at a terminal node a failed byte emits it and restarts at the root
child; a failure at an inner node re-walks), walking 1-4 chunks in lockstep: 16.1/12.7/16.6,
15.0/13.8/15.7, 15.6/15.0/17.4, 16.4/16.2/18.6. On a 2 KB text repeated (every table line in
L1) 2-4 lockstep chunks do reach 5.5-6.0 against 6.9 for this walk, but there the loop is
bound by its ~30 instructions per byte and chunk, and on real text by table misses (worse
when the chunks lie in different kinds of text) and by inner-node failures (11.7% of tokens
on the multilingual lines, each a mispredict and a re-walk). (LLVM turns such selects back
into branches unless the fallback load is unconditional and the select is mask arithmetic.)
Where the time goes: 1.22 table reads per byte; half of them hit 69 cache lines, 90% hit 1,585
lines (100 KB) and 99% 4,228 (270 KB), so beyond the hot half they come from L2; the 12 MB mix
costs 12.9 ns per token against 6.9 for the 2 KB text repeated.

`encode_plain` is the plain reference (a dict of entries, longest length first); the
compiled loops are tested against it and against the `rwkv` package.
"""

from __future__ import annotations

import numba
import numpy as np

LAYOUT_VERSION = 3  # bump when the table layout or its build changes (names the disk cache)
MAX_TOKEN_BYTES = 256  # longest entry the tables accept: bounds how far one walk reads


@numba.njit(cache=True, nogil=True)
def _build_trie(blob, offsets, ids, max_len):  # pragma: no cover - compiled
    """Trie from entries sorted by bytes: returns (n_nodes, first_child, next_sibling, byte, value).

    Nodes are numbered in preorder; children are linked in increasing byte order.
    """
    n_tok = offsets.shape[0] - 1
    cap = blob.shape[0] + 1
    first_child = np.full(cap, -1, np.int64)
    last_child = np.full(cap, -1, np.int64)
    next_sibling = np.full(cap, -1, np.int64)
    byte = np.zeros(cap, np.int64)
    value = np.zeros(cap, np.int64)
    path = np.zeros(max_len + 1, np.int64)
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
def _place(n, first_child, next_sibling, byte, node_value):  # pragma: no cover - compiled
    """Place the trie into (table uint32 = label | base << 8, value uint16), first fit, unique bases."""
    size = 2 * n + 1024
    base = np.zeros(size, np.int64)
    label = np.zeros(size, np.int64)
    value = np.zeros(size, np.int64)
    occupied = np.zeros(size, np.bool_)
    base_used = np.zeros(size, np.bool_)
    slot = np.zeros(n, np.int64)
    kids = np.zeros(256, np.int64)
    occupied[0] = True  # the root
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
        while occupied[first_free]:
            first_free += 1
        p = first_free
        while True:
            b = p - byte[kids[0]]
            ok = b >= 1 and not base_used[b]
            if ok:
                for i in range(m):
                    if occupied[b + byte[kids[i]]]:
                        ok = False
                        break
            if ok:
                break
            p += 1
            while occupied[p]:
                p += 1
        base[slot[u]] = b
        base_used[b] = True
        for i in range(m):
            t = b + byte[kids[i]]
            occupied[t] = True
            label[t] = byte[kids[i]]
            slot[kids[i]] = t
            value[t] = node_value[kids[i]]
            top = max(top, t + 1)
    size = max(top, 256) + 256  # leaves have base 0, so base + c < size always
    for t in range(256):  # the root (slot 0) and free slots: any label but their own index
        if t == 0 or not occupied[t]:
            label[t] = (t + 1) & 0xFF
    table = (label[:size] | (base[:size] << 8)).astype(np.uint32)
    return table, value[:size].astype(np.uint16)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _encode_into(data, start, end, table, value, out, k):  # pragma: no cover - compiled
    """Greedy longest match of data[start:end] written to out[k:]; returns the new k.

    Indices are uint64, so numba emits no negative-index wraparound code. A walk from i reads at
    most data[i : i + MAX_TOKEN_BYTES] (the deepest nodes are leaves), so tokens starting before
    end - MAX_TOKEN_BYTES are walked without the end check; the rest with it.
    """
    u = np.uint64
    zero, one, low8, shift = u(0), u(1), u(0xFF), u(8)
    root_base = u(table[0]) >> shift
    i, n, kk = u(start), u(end), u(k)
    safe = n - u(MAX_TOKEN_BYTES) if n > i + u(MAX_TOKEN_BYTES) else i
    while i < safe:
        t = root_base + u(data[i])  # every byte is a child of the root and an entry
        b = u(table[t]) >> shift
        best_v = value[t]
        j = i + one
        best_j = j
        while b != zero:
            c = u(data[j])
            t = b + c
            e = u(table[t])
            if (e & low8) != c:
                break
            j += one
            b = e >> shift
            v = value[t]
            if v != 0:
                best_v = v
                best_j = j
        out[kk] = best_v
        kk += one
        i = best_j
    while i < n:  # the same walk with the end check (written out twice: one numba helper for both loops,
        # inlined or per-variant, measured 1.6-1.8x slower)
        t = root_base + u(data[i])
        b = u(table[t]) >> shift
        best_v = value[t]
        j = i + one
        best_j = j
        while j < n and b != zero:
            c = u(data[j])
            t = b + c
            e = u(table[t])
            if (e & low8) != c:
                break
            j += one
            b = e >> shift
            v = value[t]
            if v != 0:
                best_v = v
                best_j = j
        out[kk] = best_v
        kk += one
        i = best_j
    return np.int64(kk)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _encode_docs(data, doc_offsets, table, value, out, tok_offsets):  # pragma: no cover - compiled
    """Encode documents data[doc_offsets[d]:doc_offsets[d+1]] one after another into out.

    out[tok_offsets[d]:tok_offsets[d+1]] receives document d; returns the total token count.
    """
    k = 0
    tok_offsets[0] = 0
    for d in range(doc_offsets.shape[0] - 1):
        k = _encode_into(data, doc_offsets[d], doc_offsets[d + 1], table, value, out, k)
        tok_offsets[d + 1] = k
    return k


@numba.njit(cache=True, nogil=True)
def _check_entries(blob, offsets, table, value):  # pragma: no cover - compiled
    """Id of the first entry (1-based, offsets[i-1]:offsets[i]) that does not encode to itself, or 0."""
    out = np.zeros(1, np.uint16)
    for i in range(1, offsets.shape[0]):
        a, b = offsets[i - 1], offsets[i]
        if b <= a:
            continue
        if _encode_into(blob, a, b, table, value, out, 0) != 1 or out[0] != i:
            return i
    return 0


def build_tables(tokens: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(table [slots] uint32, value [slots] uint16) for `tokens[id]` (tokens[0] is the unused EOD)."""
    if len(tokens) > 65536:
        raise ValueError(f"{len(tokens) - 1} entries do not fit uint16 ids")
    if len({t for t in tokens if len(t) == 1}) != 256:
        raise ValueError("the vocab must hold all 256 single bytes")
    if max(map(len, tokens)) > MAX_TOKEN_BYTES:
        raise ValueError(f"an entry is longer than {MAX_TOKEN_BYTES} bytes")
    order = sorted(range(1, len(tokens)), key=tokens.__getitem__)
    blob = np.frombuffer(b"".join(tokens[i] for i in order), np.uint8)
    offsets = np.zeros(len(order) + 1, np.int64)
    np.cumsum([len(tokens[i]) for i in order], out=offsets[1:])
    ids = np.asarray(order, np.int64)
    n, first_child, next_sibling, byte, node_value = _build_trie(blob, offsets, ids, max(map(len, tokens)))
    if n >= 1 << 23:
        raise ValueError(f"{n} trie nodes do not fit the 24-bit base field")
    return _place(n, first_child, next_sibling, byte, node_value)


def check_tables(
    tokens_blob: np.ndarray, token_offsets: np.ndarray, table: np.ndarray, value: np.ndarray
) -> int:
    """0 if every entry encodes to exactly its own id with these tables, else the first id that does not."""
    return int(_check_entries(tokens_blob, token_offsets, table, value))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def encode_buffer(data, table, value):  # pragma: no cover - compiled
    """Token ids [n_tokens] uint16 of `bytes` or a uint8 array: a view into a [len(data)] buffer.

    One compiled call per text keeps the per-call cost near 1 us for short strings.
    """
    out = np.empty(len(data), np.uint16)
    k = _encode_into(data, 0, len(data), table, value, out, 0)
    return out[:k]


def encode_docs(
    data: np.ndarray, doc_offsets: np.ndarray, table: np.ndarray, value: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Encode concatenated documents: (ids [n_tokens] uint16, token offsets [n_docs + 1] int64)."""
    out = np.empty(data.shape[0], np.uint16)
    tok_offsets = np.empty(doc_offsets.shape[0], np.int64)
    k = _encode_docs(data, doc_offsets, table, value, out, tok_offsets)
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
