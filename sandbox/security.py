"""Who may call the API, and over what: TLS credentials, bearer tokens with roles, and the
listen policy of ``sandbox serve``.

::

    client ──TLS (mTLS: client certificate)──▶ grpc.aio server
      authorization: Bearer TOKEN                 │ AuthInterceptor: TokenTable.role(TOKEN)
                                                  ▼   none/unknown → UNAUTHENTICATED
                                            the servicer  role too weak → PERMISSION_DENIED

- **Tokens** (``--auth-tokens FILE``): one ``ROLE TOKEN`` per line (``#`` comments, blank
  lines ignored). ``TOKEN`` is the secret itself (at least 16 characters) or ``sha256:HEX``,
  the hex SHA-256 of the secret, so the file need not hold secrets. Callers send
  ``authorization: Bearer TOKEN``. Roles: ``invoke`` may call :data:`INVOKE_METHODS` (and
  server reflection); ``admin`` may call everything. The health service is open to all
  (probes). :meth:`TokenTable.reload` reads the file again (``sandbox serve`` does it on
  SIGHUP): calls in flight are not touched, and a file that does not parse leaves the old
  table in force.
- **TLS** (``--tls-cert``, ``--tls-key``; ``--tls-client-ca`` requires client certificates
  signed by that CA): :func:`server_credentials`; clients use :func:`channel_credentials`.
- **Listen policy**: :func:`check_listen` refuses an address that is not loopback or a unix
  socket unless the server has both TLS and tokens, or the operator said ``--insecure``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
import string
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from sandbox._logging import get_logger
from sandbox.errors import ConfigurationError

__all__ = [
    "INVOKE_METHODS",
    "OPEN_SERVICES",
    "ROLES",
    "AuthInterceptor",
    "TokenTable",
    "channel_credentials",
    "check_listen",
    "is_local_address",
    "load_tokens",
    "server_credentials",
    "unix_socket_path",
]

log = get_logger(__name__)

ROLES = ("invoke", "admin")
#: The methods of ``sandbox.v1.Sandbox`` an ``invoke`` token may call.
INVOKE_METHODS = frozenset({"Invoke", "InvokeStream", "InvokeMany", "GetFunction",
                            "ListFunctions", "GetInfo"})
SANDBOX_SERVICE = "sandbox.v1.Sandbox"
#: Services any caller may use, with or without a token.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
#: Services an ``invoke`` token may use besides INVOKE_METHODS (they only describe the API).
READ_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
MIN_TOKEN_CHARS = 16
_HEX = frozenset(string.hexdigits)
_PRINTABLE = frozenset(string.printable) - frozenset(string.whitespace)


# ---------------------------------------------------------------------------------------------
# Tokens

@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    role: str
    digest: bytes  # SHA-256 of the token


def load_tokens(path: str | os.PathLike[str]) -> tuple[_Entry, ...]:
    """Parse a tokens file (see the module docstring).

    Raises:
        ConfigurationError: the file cannot be read, a line is malformed (named with its
            number, never with the token), or it holds no token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"--auth-tokens {str(path)!r}: cannot read it: {exc}") \
            from None
    entries: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--auth-tokens {str(path)!r} line {number}"
        parts = line.split()
        if len(parts) != 2:
            raise ConfigurationError(f"{where}: expected ROLE TOKEN (two fields), got "
                                     f"{len(parts)}")
        role, token = parts
        if role not in ROLES:
            raise ConfigurationError(f"{where}: unknown role {role!r}; expected one of "
                                     f"{', '.join(ROLES)}")
        if token.startswith("sha256:"):
            hexdigest = token[len("sha256:"):].lower()
            if len(hexdigest) != 64 or not set(hexdigest) <= _HEX:
                raise ConfigurationError(f"{where}: sha256: must be followed by 64 hex "
                                         f"digits, got {len(hexdigest)} characters")
            digest = bytes.fromhex(hexdigest)
        else:
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigurationError(f"{where}: the token is {len(token)} characters; "
                                         f"use at least {MIN_TOKEN_CHARS}")
            if not set(token) <= _PRINTABLE:
                raise ConfigurationError(f"{where}: the token must be printable ASCII")
            digest = hashlib.sha256(token.encode()).digest()
        if entries.get(digest, role) != role:
            raise ConfigurationError(f"{where}: this token is already given the role "
                                     f"{entries[digest]!r}")
        entries[digest] = role
    if not entries:
        raise ConfigurationError(f"--auth-tokens {str(path)!r}: no token in the file")
    return tuple(_Entry(role, digest) for digest, role in entries.items())


class TokenTable:
    """The tokens of a file, and their roles; :meth:`reload` swaps in a new table at once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries = load_tokens(self.path)

    def __len__(self) -> int:
        return len(self._entries)

    def reload(self) -> int:
        """Read the file again; returns the number of tokens.

        Raises:
            ConfigurationError: the new file does not parse (the old table stays in force).
        """
        entries = load_tokens(self.path)
        self._entries = entries
        return len(entries)

    def role(self, token: str) -> str | None:
        """The role of ``token``, None if unknown. Compares digests in constant time, against
        every entry."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.role
        return found


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def allowed(role: str, service: str, method: str) -> bool:
    """Whether ``role`` may call ``/service/method``."""
    if role == "admin" or service in OPEN_SERVICES:
        return True
    if service == SANDBOX_SERVICE:
        return method in INVOKE_METHODS
    return service in READ_SERVICES


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
          details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``code``."""
    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            abort, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            abort, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            abort, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        abort, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bearer tokens and roles for every RPC but the health service's."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens
        #: denials made once per (method, code, details): a handler is not built per call
        self._denials: dict[tuple[str, grpc.StatusCode, str], grpc.RpcMethodHandler] = {}

    def _deny(self, full: str, handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
              details: str) -> grpc.RpcMethodHandler:
        key = (full, code, details)
        denial = self._denials.get(key)
        if denial is None:
            denial = self._denials[key] = _deny(handler, code, details)
        return denial

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full: str = handler_call_details.method
        _, _, rest = full.partition("/")
        service, _, method = rest.partition("/")
        if handler is None or service in OPEN_SERVICES:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        role = self.tokens.role(token) if token is not None else None
        if role is None:
            why = ("no token: send the metadata 'authorization: Bearer TOKEN'" if token is None
                   else "unknown token")
            return self._deny(full, handler, grpc.StatusCode.UNAUTHENTICATED, why)
        if not allowed(role, service, method):
            return self._deny(full, handler, grpc.StatusCode.PERMISSION_DENIED,
                              f"a token of role {role!r} may not call {method}; it needs "
                              "'admin'")
        return handler


# ---------------------------------------------------------------------------------------------
# TLS

def _read(path: str | os.PathLike[str], flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{flag} {str(path)!r}: cannot read it: {exc.strerror or exc}"
                                 ) from None
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"{flag} {str(path)!r}: not a PEM file")
    return data


def server_credentials(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                       client_ca: str | os.PathLike[str] | None = None
                       ) -> grpc.ServerCredentials:
    """TLS credentials of the server; with ``client_ca``, clients must present a certificate
    that CA signed (mTLS).

    Raises:
        ConfigurationError: a file cannot be read, is not PEM, or the key does not match the
            certificate (checked now, not at the first handshake).
    """
    cert_pem = _read(cert, "--tls-cert")
    key_pem = _read(key, "--tls-key")
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(os.fspath(cert), os.fspath(key))
    except ssl.SSLError as exc:
        raise ConfigurationError(f"--tls-cert {str(cert)!r} / --tls-key {str(key)!r}: "
                                 f"{exc.reason or exc}") from None
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read(client_ca, "--tls-client-ca")
        try:
            check.load_verify_locations(cafile=os.fspath(client_ca))
        except ssl.SSLError as exc:
            raise ConfigurationError(f"--tls-client-ca {str(client_ca)!r}: "
                                     f"{exc.reason or exc}") from None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)


def _material(value: str | os.PathLike[str] | bytes | None, flag: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return _read(value, flag)


def channel_credentials(ca: str | os.PathLike[str] | bytes | None = None,
                        cert: str | os.PathLike[str] | bytes | None = None,
                        key: str | os.PathLike[str] | bytes | None = None
                        ) -> grpc.ChannelCredentials:
    """TLS credentials of a client: ``ca`` (PEM, or a file) verifies the server (default:
    the system's roots); ``cert`` and ``key`` are the client's, for mTLS.

    Raises:
        ConfigurationError: a file cannot be read or is not PEM; only one of cert and key.
    """
    if (cert is None) != (key is None):
        raise ConfigurationError("give both tls_cert and tls_key (the client's certificate "
                                 "and its key), or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_material(ca, "--tls-ca"),
        private_key=_material(key, "--tls-key"),
        certificate_chain=_material(cert, "--tls-cert"))


# ---------------------------------------------------------------------------------------------
# Where the server may listen

def unix_socket_path(address: str) -> str | None:
    """The path of a ``unix:PATH`` (or ``unix://ABSOLUTE``) address, else None."""
    if not address.startswith("unix:"):
        return None
    path = address[len("unix:"):]
    if path.startswith("//"):
        path = path[2:]
    return path


def is_local_address(address: str) -> bool:
    """Whether only this machine can reach ``address``: a unix socket, or a host that is (or
    resolves only to) loopback."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host, sep, _ = address.rpartition(":")
    if not sep:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return False  # every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)


def check_listen(address: str, *, tls: bool, auth: bool, insecure: bool) -> None:
    """Refuse to serve a non-local address without both TLS and tokens (unless ``insecure``).

    Raises:
        ConfigurationError: naming what is missing and the flags that fix it.
    """
    if insecure or is_local_address(address) or (tls and auth):
        return
    missing = [what for what, have in (("TLS (--tls-cert and --tls-key)", tls),
                                       ("authentication (--auth-tokens)", auth)) if not have]
    raise ConfigurationError(
        f"refusing to listen on {address!r}: it is not a loopback address or a unix socket, "
        f"and the server has no {' and no '.join(missing)}, so anyone who reaches it could "
        "deploy and run code. Add them, listen on 127.0.0.1 or unix:PATH, or pass --insecure "
        "to accept the risk")
