"""The spool's write probe: the real one on the filesystem, and its cache with a fake clock."""

from __future__ import annotations

from pathlib import Path

from agent.spool.writable import SpoolWritable


def test_real_probe_names_the_error_and_leaves_nothing(tmp_path: Path) -> None:
    assert SpoolWritable(tmp_path).problem() is None
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert SpoolWritable(blocker / "tmp").problem() == "Not a directory"


def test_answer_is_cached_for_a_second() -> None:
    now = [0.0]
    failing = [True]
    calls = []

    def probe(folder: Path) -> None:
        calls.append(folder)
        if failing[0]:
            raise PermissionError(13, "Permission denied")

    writable = SpoolWritable(Path("/spool/tmp"), probe=probe, clock=lambda: now[0])
    assert writable.problem() == "Permission denied"
    failing[0] = False
    now[0] = 0.5
    assert writable.problem() == "Permission denied"
    now[0] = 1.0
    assert writable.problem() is None
    assert len(calls) == 2
