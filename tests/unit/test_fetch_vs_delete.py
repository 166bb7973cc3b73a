"""A fetch racing a delete of the same entries answers NotFound, never an internal error: the fetch checks its ids
without the stream's lock, so an entry may go between its check and its read. A real bank, real threads; the
interpreter switches threads as often as it can, so the race is exercised on every run."""

from __future__ import annotations

import sys
import threading

from conftest import make_entry, make_spec

from memory_service import LocalMemory, NotFound


def test_fetch_racing_delete_is_not_found_never_an_internal_error(tmp_path):
    failures: list[BaseException] = []
    old = sys.getswitchinterval()
    with LocalMemory(str(tmp_path)) as m:
        m.create_stream(make_spec())
        for round_ in range(4):
            ids = m.put("cam0", [make_entry(i) for i in range(40)])
            done = threading.Event()

            def fetcher(ids=ids, done=done) -> None:
                while not done.is_set():
                    try:
                        m.bank.fetch_layout("cam0", ids)
                    except NotFound:
                        pass
                    except BaseException as exc:  # noqa: BLE001 - what the test is about
                        failures.append(exc)
                        return

            threads = [threading.Thread(target=fetcher) for _ in range(2)]
            sys.setswitchinterval(1e-6)
            try:
                for t in threads:
                    t.start()
                for eid in ids:
                    m.delete("cam0", [eid])
                done.set()
                for t in threads:
                    t.join()
            finally:
                sys.setswitchinterval(old)
    assert not failures, repr(failures[0])
