"""Per-write randomness (replayer/entropy.py): what it says of kinds of data, that ingest
stores it in `writes`, and that a store made before the column gets it (migration)."""
from __future__ import annotations

import lzma
import os
import random
import zlib
from pathlib import Path

import duckdb
import numpy as np
from synth import SynthSession, cli_main

from blkrewind.replayer import entropy
from blkrewind.replayer.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _text(n: int) -> bytes:
    src = b"".join(p.read_bytes() for p in sorted((ROOT / "replayer").glob("*.py")))
    return (src * (n // len(src) + 1))[:n]


def test_kinds_of_data():
    rng = random.Random(1)
    text = _text(1 << 20)
    assert entropy.of_bytes(rng.randbytes(4096)) == 1.0
    assert entropy.of_bytes(rng.randbytes(1 << 20)) == 1.0
    assert entropy.of_bytes(bytes(65536)) == 0.0
    assert entropy.of_bytes(text[:65536]) == 0.0
    assert entropy.of_bytes(zlib.compress(text, 6)[:65536]) >= 0.9
    assert entropy.of_bytes(lzma.compress(text)[:65536]) >= 0.9
    import base64
    assert entropy.of_bytes(base64.b64encode(rng.randbytes(49152))) == 0.0
    half = entropy.of_bytes(text[:32768] + rng.randbytes(32768))
    assert 0.4 <= half <= 0.6
    assert np.isnan(entropy.of_bytes(b"x" * 100))   # too short to say


def test_rows_of_a_column():
    rng = random.Random(2)
    parts = [rng.randbytes(4096), bytes(8192), _text(4096), b"", rng.randbytes(1 << 20)]
    offs = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offs[1:])
    r = entropy.randomness(b"".join(parts), offs)
    assert r.dtype == np.float32 and len(r) == 5
    assert r[0] == 1.0 and r[1] == 0.0 and r[2] == 0.0 and np.isnan(r[3]) and r[4] == 1.0


def _session(tmp_path) -> SynthSession:
    rng = random.Random(3)
    s = SynthSession(str(tmp_path / "log"), seed=3, initial=_text(4 << 20))
    s.baseline()
    s.write(0, rng.randbytes(64 << 10), comm="crypt")
    s.write(1 << 20, _text(64 << 10), comm="editor")
    s.end()
    return s


def test_writes_have_randomness(tmp_path, capsys):
    _session(tmp_path)
    store = tmp_path / "store"
    rc, _, err = cli_main(capsys, "ingest", "--log", tmp_path / "log", "--store", store)
    assert rc == 0, err
    rc, out, err = cli_main(capsys, "sql", "--store", store, "--format", "csv",
                            "SELECT comm, randomness FROM writes WHERE comm IN ('crypt', 'editor') "
                            "ORDER BY comm")
    assert rc == 0, err
    assert out.splitlines()[1:] == ["crypt,1.0", "editor,0.0"]
    with Store.open(store) as st:   # baseline chunks: text (a few re-reads after random writes)
        assert st.query_one("SELECT median(randomness) FROM base")[0] == 0.0


def test_store_made_before_the_column(tmp_path, capsys):
    _session(tmp_path)
    store = tmp_path / "store"
    rc, _, err = cli_main(capsys, "ingest", "--log", tmp_path / "log", "--store", store)
    assert rc == 0, err
    con = duckdb.connect(str(store / "meta.duckdb"))
    con.execute("ALTER TABLE records DROP COLUMN randomness")
    con.execute("ALTER TABLE base DROP COLUMN randomness")
    con.close()
    # a reader of the old store: the view works, randomness is NULL
    rc, out, err = cli_main(capsys, "sql", "--store", store, "--format", "csv",
                            "SELECT count(*), count(randomness) FROM writes")
    assert rc == 0, err
    n = int(out.splitlines()[1].split(",")[0])
    assert n > 0 and out.splitlines()[1] == f"{n},0"
    # the next writer adds the columns; old rows keep NULL, new rows get a value
    s2 = SynthSession(str(tmp_path / "log2"), seed=4)
    s2.baseline()
    s2.write(0, os.urandom(8192), comm="later")
    s2.end()
    rc, _, err = cli_main(capsys, "ingest", "--log", tmp_path / "log2", "--store", store)
    assert rc == 0, err
    rc, out, err = cli_main(capsys, "sql", "--store", store, "--format", "csv",
                            "SELECT comm, randomness FROM writes WHERE comm IN ('later', 'crypt') "
                            "ORDER BY comm")
    assert rc == 0, err
    assert out.splitlines()[1:] == ["crypt,", "later,1.0"]
