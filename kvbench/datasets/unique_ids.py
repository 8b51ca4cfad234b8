"""Ids for records a source names alike: a sample id must be unique (resume and scoring key rows by it), and a
source may repeat a title or an ``_id`` for records that are still separate samples."""

from __future__ import annotations


class UniqueIds:
    """The first record of a name keeps it, later ones become ``name_2``, ``name_3``, ... skipping any id already
    given (a record of its own may be called ``emma_2``)."""

    def __init__(self) -> None:
        self._given: set[str] = set()
        self._count: dict[str, int] = {}

    def __call__(self, name: str) -> str:
        candidate = name
        while candidate in self._given:
            self._count[name] = self._count.get(name, 1) + 1
            candidate = f"{name}_{self._count[name]}"
        self._given.add(candidate)
        return candidate
