"""Text corpora that ship with Python itself, so nothing is downloaded.

The Python language reference (``pydoc_data.topics``, in every CPython) is
long English prose about one subject: haystacks for retrieval, and the token
stream an activation store is built from.
"""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1)
def python_reference() -> str:
    """The Python language reference's topics, sorted by name, prose lines unwrapped (~1.5 MB)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return re.sub(r"(?<=\S)\n(?=\S)", " ", text)  # unwrap the hard-wrapped prose lines

