"""Filter stage: cheap document-quality heuristics that keep or drop, never edit.

``check(text, cfg)`` returns ``None`` (keep) or the drop reason. The heuristics follow the
Gopher rules (Rae et al. 2021, appendix A: duplicate-line fraction) plus two guards that
catch generated junk in any script (long single-character runs, very few distinct
characters). Every test is a C-speed ``str`` operation or one regex scan, so the stage runs
at hundreds of MB/s and never dominates the pipeline.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pipeline.manifest import FilterConfig

REASONS = ("too_short", "too_long", "low_diversity", "char_run", "dup_lines")


@lru_cache(maxsize=16)
def _run_re(n: int) -> re.Pattern:
    return re.compile(r"(.)\1{" + str(n) + ",}", re.S)


def has_char_run_reference(text: str, limit: int) -> bool:
    """Plain version: some character repeats more than ``limit`` times in a row."""
    return _run_re(limit).search(text) is not None


def has_char_run(text: str, limit: int) -> bool:
    """Fast version of ``has_char_run_reference``: a run of ``limit + 1`` equal characters covers
    two samples taken every ``step = (limit + 1) // 2`` characters, so only windows around equal
    neighbouring samples need the regex (a C-level slice plus a short scan instead of a regex
    pass over the whole document)."""
    step = max(1, (limit + 1) // 2)
    if len(text) <= limit:
        return False
    samples = text[::step]
    rx = _run_re(limit)
    for i in range(len(samples) - 1):
        if samples[i] == samples[i + 1]:
            m = i * step
            # a run through both samples makes every character between them equal
            if text.count(samples[i], m, m + step + 1) == step + 1 and rx.search(
                    text, max(0, m - limit), m + limit + 1):
                return True
    return False


def dup_line_frac_reference(text: str, min_line_chars: int = 8) -> float:
    """Fraction of lines (at least ``min_line_chars`` non-blank characters, so braces and blank
    lines of code do not count) that repeat an earlier line; 0 for fewer than 4 such lines."""
    lines = [ln for ln in text.splitlines() if len(ln.strip()) >= min_line_chars]
    if len(lines) < 4:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def dup_line_frac(text: str, min_line_chars: int = 8) -> float:
    """Same value as ``dup_line_frac_reference``; most documents repeat no line except empty
    ones, which a C-level set and count detect without the per-line Python loop."""
    raw = text.splitlines()
    empties = raw.count("")
    if len(raw) - len(set(raw)) <= max(0, empties - 1):
        return 0.0
    return dup_line_frac_reference(text, min_line_chars)


def check_reference(text: str, cfg: FilterConfig) -> str | None:
    """Plain version of ``check``: every rule on the whole text, no shortcuts."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if len(set(text)) < cfg.min_distinct_chars:
        return "low_diversity"
    if cfg.max_char_run and has_char_run_reference(text, cfg.max_char_run):
        return "char_run"
    if dup_line_frac_reference(text) > cfg.max_dup_line_frac:
        return "dup_lines"
    return None


def _may_have_4_lines(text: str) -> bool:
    """Cheap necessary condition for ``len(text.splitlines()) >= 4`` (3 line breaks): every break
    ``splitlines`` knows besides ``\\n`` (``\\r``, ``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1e``,
    ``\\x85``, U+2028, U+2029) is a non-printable character."""
    return text.count("\n") >= 3 or not text.isprintable()


def check(text: str, cfg: FilterConfig) -> str | None:
    """Fast version of ``check_reference`` (same result for every text)."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    # a prefix's characters are a subset of the text's, so the full set is only built for
    # documents whose first 256 characters are not already diverse enough
    if len(set(text[:256])) < cfg.min_distinct_chars and len(set(text)) < cfg.min_distinct_chars:
        return "low_diversity"
    if cfg.max_char_run and has_char_run(text, cfg.max_char_run):
        return "char_run"
    if _may_have_4_lines(text) and dup_line_frac(text) > cfg.max_dup_line_frac:
        return "dup_lines"
    return None
