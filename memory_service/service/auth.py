"""Bearer-token authentication and tenancy.

Owns who a caller is. A token file holds one token per line, `tenant:token` (or `tenant:token:ro` for a
read-only token; a bare `token` belongs to tenant "default"); blank lines and `#` comments are skipped.
Tokens are compared in constant time against every known token. Promises:
- no auth configured: every caller is the anonymous tenant "" with full rights;
- a missing or wrong token is Unauthenticated, whatever the method;
- stream names are resolved inside the caller's tenant (`tenant/name` in the bank), so one tenant can neither
  see nor guess another's streams; naming another tenant explicitly (`other/name`) or writing with a
  read-only token is PermissionDenied.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from memory_service.errors import InvalidArgument, PermissionDenied, Unauthenticated

SEP = "/"
READ_ONLY_METHODS = frozenset({"ListStreams", "Query", "Fetch", "QueryFetch", "Stats", "ListEntries", "RegisterArena",
                               "ReleaseArena"})


@dataclass(frozen=True)
class Identity:
    tenant: str
    read_only: bool = False

    def qualify(self, name: str) -> str:
        """The bank's name for the caller's stream `name`."""
        if not self.tenant:
            return name
        owner, sep, rest = name.partition(SEP)
        if sep:
            if owner != self.tenant:
                raise PermissionDenied(f"stream {name!r} names tenant {owner!r}; your token belongs to tenant "
                                       f"{self.tenant!r} and may only address its own streams")
            return name
        return f"{self.tenant}{SEP}{name}"

    def owns(self, bank_name: str) -> bool:
        return not self.tenant or bank_name.startswith(self.tenant + SEP)

    def local(self, bank_name: str) -> str:
        """The caller's name for a bank stream it owns."""
        return bank_name[len(self.tenant) + 1:] if self.tenant else bank_name

    def check_write(self, method: str) -> None:
        if self.read_only and method not in READ_ONLY_METHODS:
            raise PermissionDenied(f"{method} changes the bank; your token for tenant {self.tenant!r} is read-only")


ANONYMOUS = Identity("")


class Authenticator:
    def __init__(self, tokens: Sequence[tuple[str, str, bool]]) -> None:
        self._tokens = [(t.encode(), Identity(tenant, ro)) for tenant, t, ro in tokens]

    @property
    def tenants(self) -> frozenset[str]:
        """Every tenant a token names (quotas are per tenant, so this bounds what all tenants can hold)."""
        return frozenset(identity.tenant for _, identity in self._tokens)

    @staticmethod
    def from_file(path: Optional[str]) -> Optional["Authenticator"]:
        if not path:
            return None
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read auth token file {path}: {exc}") from None
        tokens = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) == 1:
                parts = ["default", parts[0]]
            if len(parts) not in (2, 3) or not parts[0] or len(parts[1]) < 16 or (len(parts) == 3 and parts[2] != "ro"):
                raise InvalidArgument(f"auth token file {path} line {n}: expected 'tenant:token' or "
                                      "'tenant:token:ro' with a token of at least 16 characters")
            if SEP in parts[0]:
                raise InvalidArgument(f"auth token file {path} line {n}: tenant {parts[0]!r} may not contain {SEP!r}")
            tokens.append((parts[0], parts[1], len(parts) == 3))
        if not tokens:
            raise InvalidArgument(f"auth token file {path} holds no tokens")
        return Authenticator(tokens)

    def identify(self, metadata) -> Identity:
        """The caller behind `authorization: Bearer <token>` metadata, or Unauthenticated."""
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value
        if header is None:
            raise Unauthenticated("no 'authorization' metadata; expected 'Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed 'authorization' metadata; expected 'Bearer <token>'")
        given = token.strip().encode()
        found = None
        for known, identity in self._tokens:  # compare against every token: time does not reveal which matched
            if hmac.compare_digest(given, known):
                found = identity
        if found is None:
            raise Unauthenticated("the bearer token is not valid for this service")
        return found
