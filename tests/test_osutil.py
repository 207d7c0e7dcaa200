"""The registries' JSON records (blkrewind/osutil.py: save_json, load_json_dir), which
`mount` (replayer/mounts.py) and the pinned captures (tracer/pins.py) keep under /run."""
from __future__ import annotations

import os

from blkrewind.osutil import load_json_dir, save_json
from blkrewind.tracer import pins


def test_registry_records_whole_or_none(tmp_path):
    d = tmp_path / "reg"
    assert load_json_dir(str(d)) == []            # no directory yet: no records
    save_json(str(d / "b.json"), {"n": 2})
    save_json(str(d / "a.json"), {"n": 1})
    save_json(str(d / "a.json"), {"n": 3})        # replaced whole
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    (d / "torn.json").write_text('{"n": ')        # a torn record reads as None
    (d / "x.json.tmp").write_text("{}")           # an unfinished one is not a record
    assert load_json_dir(str(d)) == [(str(d / "a.json"), {"n": 3}), (str(d / "b.json"), {"n": 2}),
                                     (str(d / "torn.json"), None)]


def test_torn_pin_records_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(pins, "REG_DIR", str(tmp_path))
    p = pins.Pinned(session="s1", log_dir="/l", host="h", boot_id="b", pid=1, devices=[],
                    regions=[], ring_bytes=1 << 20, dirty_regions=0)
    pins.save(p)
    (tmp_path / "torn.json").write_text("[1, 2")
    (tmp_path / "other.json").write_text("[1, 2]")   # parsed, but not a record
    assert [x.session for x in pins.load_all()] == [p.session]
    assert sorted(os.listdir(tmp_path)) == [p.session + ".json"]
