"""One hostile request payload for the call decoders, shared by hypothesis and atheris.

The first byte picks a call from the table; the rest is the payload a zone sent for it. The
decoder must either raise DecodeError or return fields that encode back to exactly the same
bytes (only the canonical encoding is accepted, so nothing ambiguous reaches a handler).
"""

from idm.callcodec import DecodeError
from idm.gen.codec import CALLS

CODECS = [CALLS[op] for op in sorted(CALLS)]


def decode_hostile_request(data: bytes) -> bool:
    """True if the payload decoded (and round-tripped)."""
    if not data:
        return False
    codec = CODECS[data[0] % len(CODECS)]
    payload = data[1:]
    try:
        request = codec.decode_request(payload)
    except DecodeError:
        return False
    assert codec.encode_request(*request) == payload, codec.name
    return True
