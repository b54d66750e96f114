"""A real PostgreSQL server for the tests: Debian's package, a temporary cluster, loopback TCP.

:class:`Postgres` runs ``initdb`` and ``postgres`` from the installed server (the
``postgresql`` package puts them under ``/usr/lib/postgresql/<major>/bin``) in a temporary
directory; as root, the cluster belongs to an ordinary user and both programs run as that
user. Readiness is read from the server's own log line, never polled with sleeps.
:meth:`Postgres.database` makes a fresh database per test, so tests never see each other's
rows; :meth:`Postgres.stop` and :meth:`Postgres.start` take the server down and bring it back
on the same port, for the tests of what a fleet does while its database is away (such a test
starts a server of its own, ``with Postgres() as pg:``: the session's shared one is never
stopped).

:func:`unavailable` says why no server can be started here (the tests skip with that
reason), or ``None``.

The code lives in ``benchmarks/localfleet.py`` (one copy, shared with the ``fleet`` benchmark
suite and ``examples/fleet.py``); this module re-exports it under the name the tests import.
"""

from __future__ import annotations

from benchmarks.localfleet import Postgres, bindir, unavailable

__all__ = ["Postgres", "bindir", "unavailable"]
