"""Ed25519 signature *verification* in pure Python (RFC 8032 §5.1), for boards without ``cryptography``.

The on-board runtime may rely only on the standard library, numpy and onnxruntime, so it checks bundle
signatures with this module. Only verification is here (signing happens on the server, with the
``cryptography`` package); nothing secret is handled, so constant-time arithmetic is not needed. The
tests cross-check it against ``cryptography`` on random keys, messages and tampered signatures.

Points are kept in extended homogeneous coordinates (X : Y : Z : T) with x = X/Z, y = Y/Z, xy = T/Z.
"""

from __future__ import annotations

import hashlib

P = 2**255 - 19  # the field prime
L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
D = -121665 * pow(121666, P - 2, P) % P  # curve constant d = -121665 / 121666
SQRT_M1 = pow(2, (P - 1) // 4, P)  # a square root of -1

Point = tuple[int, int, int, int]


def _add(p: Point, q: Point) -> Point:
    """Point addition on the twisted Edwards curve (RFC 8032 §5.1.4; also valid for doubling)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _mul(k: int, p: Point) -> Point:
    """[k]p by double-and-add."""
    acc: Point = (0, 1, 1, 0)  # the neutral element
    while k:
        if k & 1:
            acc = _add(acc, p)
        p = _add(p, p)
        k >>= 1
    return acc


def _equal(p: Point, q: Point) -> bool:
    x1, y1, z1, _ = p
    x2, y2, z2, _ = q
    return (x1 * z2 - x2 * z1) % P == 0 and (y1 * z2 - y2 * z1) % P == 0


def _recover_x(y: int, sign: int) -> int | None:
    """x with x^2 = (y^2 - 1) / (d y^2 + 1) and x mod 2 == sign, or None if there is none."""
    if y >= P:
        return None
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if (v * x * x - u) % P != 0:
        if (v * x * x + u) % P != 0:
            return None
        x = x * SQRT_M1 % P
    if x == 0 and sign:
        return None
    return P - x if x & 1 != sign else x


def _decode(data: bytes) -> Point | None:
    if len(data) != 32:
        return None
    n = int.from_bytes(data, "little")
    y, sign = n & ((1 << 255) - 1), n >> 255
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


_BY = 4 * pow(5, P - 2, P) % P
_BX = _recover_x(_BY, 0)
assert _BX is not None
BASE: Point = (_BX, _BY, 1, _BX * _BY % P)


def is_public_key(public_key: bytes) -> bool:
    """True iff ``public_key`` is 32 bytes that decode to a point of the curve (a key that can verify anything)."""
    return len(public_key) == 32 and _decode(public_key) is not None


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` under the 32-byte ``public_key``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decode(public_key)
    r = _decode(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % L
    return _equal(_mul(s, BASE), _add(r, _mul(k, a)))
