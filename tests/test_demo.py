"""The README's first command runs `blkrewind demo`: it must work end to end (a loop device,
certificates, `serve` over mutual TLS, `trace --ship`, marks, status, SQL, restore onto a loop
device through the running replayer) and leave nothing behind."""
from __future__ import annotations

import pytest
from tracerproc import cli

pytestmark = [pytest.mark.bpf]


def test_demo_shows_the_whole_cycle_and_cleans_up(tmp_path):
    work = tmp_path / "demo"
    r = cli("demo", "--dir", work, timeout=600)
    out = r.stdout
    assert "story.txt at v1: 'Once upon a time, version ONE" in out, out
    assert "data.bin present again: True, new.txt absent: True" in out, out
    assert "the earlier content is back" in out, out
    assert "everything acknowledged" in out, out
