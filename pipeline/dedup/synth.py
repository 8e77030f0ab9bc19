"""A synthetic multilingual corpus with planted near-duplicates, and quality metrics against it.

Unrelated documents are Zipf-distributed random text in six scripts (Latin with spaces, Cyrillic,
Greek, Arabic, and Chinese / Japanese without spaces). A fraction of documents are planted copies
of an earlier-generated source, placed anywhere in the corpus: exact copies, small edits (a few
words or characters replaced), an added footer, changed whitespace, and heavier edits that land
below the threshold. Ground truth is the exact Jaccard of shingle sets (`minhash.jaccard_reference`),
never the planting recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import MinHashConfig
from .minhash import jaccard_reference

_ALPHABETS = {
    "en": "etaoinshrdlcumwfgypbvkjxqz",
    "ru": "оеаинтсрвлкмдпуяыьгзбчйхжшюцщэфъё",
    "el": "αβγδεζηθικλμνξοπρστυφχψω",
    "ar": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
}
_CJK = {
    "zh": [chr(c) for c in range(0x4E00, 0x4E00 + 3000)],
    "ja": [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x4E00, 0x4E00 + 800)],
}
FOOTER = "\n\nThis article was originally published by the editors. All rights reserved. Share it."


@dataclass
class SynthConfig:
    """Size and mix of the synthetic corpus."""

    docs: int = 2000
    """Total documents, planted copies included."""
    copy_fraction: float = 0.2
    """Fraction of documents that are planted copies."""
    mean_chars: int = 2000
    """Approximate document length in characters."""
    seed: int = 0


def _vocab(rng: np.random.Generator, alphabet: str, size: int = 4000) -> list[str]:
    lens = rng.integers(2, 10, size)
    letters = np.array(list(alphabet))
    return ["".join(rng.choice(letters, n)) for n in lens]


def _zipf_idx(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    return np.minimum(rng.zipf(1.15, n) - 1, size - 1)


def _unrelated(rng: np.random.Generator, lang: str, chars: int, vocabs: dict) -> str:
    if lang in _CJK:
        sym = _CJK[lang]
        idx = _zipf_idx(rng, len(sym), chars // 2)
        text = "".join(sym[i] for i in idx)
        cut = np.sort(rng.choice(len(text), max(1, len(text) // 60), replace=False))
        return "。".join(text[a:b] for a, b in zip(np.r_[0, cut], np.r_[cut, len(text)]))
    words = vocabs[lang]
    idx = _zipf_idx(rng, len(words), chars // 6)
    return " ".join(words[i] for i in idx)


def _edit(rng: np.random.Generator, text: str, frac: float) -> str:
    """Replace about frac of the characters at random positions (with neighbours' characters)."""
    chars = list(text)
    pos = rng.choice(len(chars), max(1, int(len(chars) * frac)), replace=False)
    for p in pos:
        chars[p] = chars[(p + rng.integers(1, 50)) % len(chars)]
    return "".join(chars)


def _whitespace(rng: np.random.Generator, text: str) -> str:
    seps = np.array([" ", "  ", "\n", "\t", " \n "])
    parts = text.split(" ")
    return parts[0] + "".join(s + p for s, p in zip(rng.choice(seps, len(parts) - 1), parts[1:]))


KINDS = ("exact", "edit_small", "footer", "whitespace", "edit_heavy")


def make_corpus(cfg: SynthConfig) -> tuple[list[str], list[tuple[int, int, str]]]:
    """(texts, planted) with planted = [(source index, copy index, kind)]."""
    rng = np.random.default_rng(cfg.seed)
    vocabs = {k: _vocab(rng, a) for k, a in _ALPHABETS.items()}
    langs = list(_ALPHABETS) + list(_CJK)
    n_copy = int(cfg.docs * cfg.copy_fraction)
    n_src = cfg.docs - n_copy
    texts: list[str] = []
    for _ in range(n_src):
        chars = int(rng.integers(cfg.mean_chars // 2, cfg.mean_chars * 3 // 2))
        texts.append(_unrelated(rng, langs[int(rng.integers(len(langs)))], chars, vocabs))
    kinds = rng.choice(len(KINDS), n_copy, p=[0.2, 0.3, 0.2, 0.2, 0.1])
    planted_src = rng.integers(0, n_src, n_copy)
    copies = []
    for s, k in zip(planted_src, kinds):
        t = texts[s]
        kind = KINDS[k]
        if kind == "edit_small":
            t = _edit(rng, t, float(rng.uniform(0.001, 0.01)))
        elif kind == "footer":
            t = t + FOOTER
        elif kind == "whitespace":
            t = _whitespace(rng, t)
        elif kind == "edit_heavy":
            t = _edit(rng, t, float(rng.uniform(0.05, 0.2)))
        copies.append((int(s), t, kind))
    # interleave: the corpus order is a random permutation, so copies may precede their sources
    order = rng.permutation(cfg.docs)  # new position of old index
    out = [""] * cfg.docs
    for i, t in enumerate(texts):
        out[order[i]] = t
    planted = []
    for j, (s, t, kind) in enumerate(copies):
        out[order[n_src + j]] = t
        planted.append((int(order[s]), int(order[n_src + j]), kind))
    return out, planted


def evaluate(
    texts: list[str],
    planted: list[tuple[int, int, str]],
    removed: np.ndarray,
    dup_of: np.ndarray,
    cfg: MinHashConfig | None = None,
    high: float = 0.9,
    gross: float = 0.5,
    cache: dict | None = None,
) -> dict:
    """Recall on planted pairs with exact Jaccard >= high; gross errors among removals.

    A planted pair counts as found when source and copy end in the same cluster (the cluster of a
    removed document is its duplicate_of, of a kept one itself). A removal is a gross error when
    its exact Jaccard to the document it names is < gross.
    """
    cfg = cfg or MinHashConfig()
    cache = {} if cache is None else cache  # (i, j) -> exact Jaccard, shared across calls on one corpus

    def jac(i: int, j: int) -> float:
        if (i, j) not in cache:
            cache[i, j] = jaccard_reference(texts[i], texts[j], cfg)
        return cache[i, j]

    cluster = np.arange(len(texts))
    cluster[removed] = dup_of
    per_kind: dict[str, list[int]] = {}
    hits = total = 0
    for s, c, kind in planted:
        j = jac(s, c)
        same = int(cluster[s] == cluster[c])
        rec = per_kind.setdefault(kind, [0, 0])
        rec[0] += same
        rec[1] += 1
        if j >= high:
            hits += same
            total += 1
    bad = sum(jac(r, d) < gross for r, d in zip(removed.tolist(), dup_of.tolist()))
    return {
        "recall_high": hits / max(total, 1),
        "pairs_high": total,
        "removed": len(removed),
        "gross_errors": int(bad),
        "gross_error_rate": bad / max(len(removed), 1),
        "found_by_kind": {k: v[0] / v[1] for k, v in per_kind.items()},
    }
