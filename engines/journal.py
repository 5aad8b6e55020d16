"""Request-level resume: a JSONL journal of the requests of one engine call that finished.

One line per finished request, appended and flushed as it arrives::

    {"i": 17, "h": "4be1c0d2a9f3", "r": {"ids": [71, 5, 2]}}

``i`` is the request's index in the call and ``h`` a hash of its body, so a
restarted call with the same inputs sends only the requests without a line,
and a line written for different inputs is never mixed in. A torn last line
(the process was killed while writing it) is skipped and its request resent.

Why per request and not per shard: a shard of 64 teacher rewrites behind a
remote endpoint can take many minutes, and an endpoint that falls over (or a
stage that is killed) should cost the requests in flight, not the shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any


def body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


class Journal:
    """The journal of one call: what it already holds, and appending to it.

    ``path`` None keeps nothing (every request is sent). ``delete_when_done``
    removes the file after a call that completed, for journals the engine
    named itself; a journal the caller named is the caller's to remove.
    """

    def __init__(
        self, path: Path | None, hashes: list[str], *, delete_when_done: bool = False
    ) -> None:
        self.path, self.hashes, self.delete_when_done = path, hashes, delete_when_done
        self._fh: IO[str] | None = None

    @classmethod
    def for_call(
        cls, bodies: list[dict[str, Any]], path: Path | str | None, directory: Path | None
    ) -> Journal:
        """``path`` if given; else a file in ``directory`` named by the hash of every body."""
        hashes = [body_hash(b) for b in bodies]
        if path is not None:
            return cls(Path(path), hashes)
        if directory is None:
            return cls(None, hashes)
        digest = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        return cls(directory / f"requests-{digest}.jsonl", hashes, delete_when_done=True)

    def finished(self) -> dict[int, Any]:
        """Index -> stored result of every request of this call already in the file."""
        if self.path is None or not self.path.is_file():
            return {}
        found: dict[int, Any] = {}
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    i = int(rec["i"])
                except (ValueError, KeyError, TypeError):
                    continue
                if 0 <= i < len(self.hashes) and rec.get("h") == self.hashes[i]:
                    found[i] = rec["r"]
        return found

    def add(self, i: int, result: Any) -> None:
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        line = {"i": i, "h": self.hashes[i], "r": result}
        self._fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._fh.flush()  # in the OS's hands: a kill -9 after this loses nothing before it

    def close(self, *, completed: bool) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if completed and self.delete_when_done and self.path is not None:
            self.path.unlink(missing_ok=True)
