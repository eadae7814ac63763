"""Passwords (argon2), signed access tokens (JWT HS256) and opaque refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["Claims", "Passwords", "TokenError", "Tokens", "hash_refresh", "new_refresh"]


class TokenError(Exception):
    """``code`` is ``token_expired`` or ``token_invalid``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Claims:
    user: int
    device: int
    expires: int


class Tokens:
    """Short-lived access tokens: ``{"sub": user, "dev": device, "iat", "exp"}`` signed HS256."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(self, user: int, device: int, now: float | None = None) -> str:
        iat = int(time.time() if now is None else now)
        payload = {"sub": str(user), "dev": device, "iat": iat, "exp": iat + self.ttl_s}
        return jwt.encode(payload, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Claims:
        try:
            data = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
            )
            return Claims(int(data["sub"]), int(data["dev"]), int(data["exp"]))
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "access token expired: refresh it") from None
        except (jwt.InvalidTokenError, KeyError, ValueError, TypeError):
            raise TokenError("token_invalid", "access token is invalid") from None


def new_refresh() -> str:
    return secrets.token_urlsafe(32)


def hash_refresh(token: str) -> bytes:
    """Refresh tokens are random, so a fast hash is enough to keep them out of the database."""
    return hashlib.sha256(token.encode()).digest()


class Passwords:
    """argon2id hashing; call from a thread (it is CPU-bound on purpose)."""

    def __init__(self, time_cost: int, memory_kib: int) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1)
        self._dummy = self._hasher.hash(secrets.token_hex(8))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored: str | None, password: str) -> bool:
        """Constant work whether or not the user exists (``stored=None``)."""
        try:
            return self._hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)
