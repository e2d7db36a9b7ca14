"""A source that cannot run here: ``Sources`` reports ``""``; ``Watch`` says NotSupported."""

from __future__ import annotations

from wqd.errors import NotSupported


class UnavailableSource:
    backend = ""

    def __init__(self, name: str, why: str = "not available on this system") -> None:
        self.name = name
        self.why = why

    async def start(self, sink) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def resolve(self, peer, spec, options):
        raise NotSupported(f"source {self.name!r}: {self.why}")

    def routes(self, sub):
        return ()

    def attach(self, sub) -> None:
        raise NotSupported(f"source {self.name!r}: {self.why}")

    def detach(self, sub) -> None:
        pass

    def accepts(self, sub, event) -> bool:
        return False
