"""Corpora bundled in the package, named by the source string "builtin:NAME".

    clusterlm prepare --builtin shakespeare --out data/shakespeare_char --tokenizer char
    from clusterlm.data.builtin import builtin_files
    files = builtin_files("shakespeare")      # ((name, utf-8 bytes), ...) sorted by name

"shakespeare" is the 42 plays and poems in clusterlm/assets/shakespeare.tar.xz (5,057,198 bytes of
text; public domain, see clusterlm/assets/SHAKESPEARE_SOURCE.md). The archive is read in memory
(no extraction to disk); each .txt member is one document, in sorted member-name order, and is
named "builtin:shakespeare/<file>" in meta.json and in messages.
"""

from __future__ import annotations

import functools
import tarfile
from importlib.resources import files

from clusterlm.errors import DataError

PREFIX = "builtin:"
CORPORA: dict[str, str] = {"shakespeare": "shakespeare.tar.xz"}  # name -> archive in clusterlm.assets


def check_name(name: str) -> str:
    """`name` if it is a bundled corpus, else a DataError listing the bundled ones."""
    if name not in CORPORA:
        import difflib

        close = difflib.get_close_matches(name, CORPORA, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"no bundled corpus {name!r}{hint}; bundled: {', '.join(sorted(CORPORA))}")
    return name


@functools.lru_cache(maxsize=1)  # ~5 MB; prepare reads its inputs two or three times
def builtin_files(name: str) -> tuple[tuple[str, bytes], ...]:
    """The documents of a bundled corpus: (file name, raw bytes) pairs sorted by file name."""
    archive = files("clusterlm.assets").joinpath(CORPORA[check_name(name)])
    out: list[tuple[str, bytes]] = []
    with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:xz") as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.endswith(".txt"):
                f = tf.extractfile(member)
                assert f is not None  # regular files always have a payload
                out.append((member.name.rsplit("/", 1)[-1], f.read()))
    out.sort(key=lambda item: item[0])
    return tuple(out)
