"""The Public Suffix List file, read once per file and process (RFC 7489 §3.2 ``psl`` mode).

The file read lives here, at the I/O layer, so that dmarc.py stays free of I/O: it only asks
:func:`public_suffix_list` for the parsed list.
"""

from __future__ import annotations

from functools import lru_cache

from publicsuffixlist import PublicSuffixList


@lru_cache(maxsize=8)
def public_suffix_list(psl_file: str | None) -> PublicSuffixList:
    """The parsed list of ``psl_file``; None gives publicsuffixlist's bundled list.

    Raises:
        OSError: ``psl_file`` cannot be read.
        UnicodeDecodeError: it is not UTF-8 text.
    """
    if psl_file is None:
        return PublicSuffixList()
    with open(psl_file, encoding="utf-8") as source:
        return PublicSuffixList(source)
