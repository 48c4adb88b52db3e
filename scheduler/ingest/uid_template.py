"""Encodings made once around a placeholder UID, then reused with each real UID spliced in.

The SCP's per-instance encodings (the Part 10 file meta, the C-STORE response) differ within
an association only by the SOP instance UID. A placeholder of the same length ("999…", a valid
one-component UID) keeps every element length, group length and padding, so a library's own
encoding made once around it is byte-equal to encoding the real UID, as long as the
placeholder occurs in exactly one place.
"""

from __future__ import annotations

from collections.abc import Callable


def split_around_placeholder(encode: Callable[[str], bytes | None],
                             uid_length: int) -> tuple[bytes, bytes] | None:
    """``encode`` run on a placeholder UID of ``uid_length``, as (bytes before it, bytes after
    it); ``None`` when there is no encoding or the placeholder occurs elsewhere too."""
    placeholder = b"9" * uid_length
    encoded = encode(placeholder.decode("ascii"))
    if encoded is None or encoded.count(placeholder) != 1:
        return None
    head, _, tail = encoded.partition(placeholder)
    return head, tail


def splice(template: tuple[bytes, bytes], uid: str) -> bytes:
    """The encoding with ``uid`` (of the placeholder's length) in the placeholder's place."""
    head, tail = template
    return b"".join((head, uid.encode("ascii"), tail))
