"""`blkrewind report` writes one self-contained HTML page: its three figures as PNG data URIs,
its tables (writers with the process that dirtied their pages beside the submitter, regions,
episodes, marks, gaps), nothing fetched from elsewhere."""
from __future__ import annotations

import base64
import random
import re

import forensics_workloads as wl
from synth import SynthSession, cli_main


def _history(tmp_path):
    rng = random.Random(4)
    mib = 1 << 20
    img = wl.log_text(rng, 2 * mib) + bytes(2 * mib)
    s = SynthSession(str(tmp_path / "log"), seed=6, initial=img)
    s.baseline(writes_during=0, old_write=False)
    for i in range(30):
        s.write(2 * mib + i * 8192, wl.log_text(rng, 8192), comm="postgres", pid=40)
    for i in range(4):   # buffered writes: the flusher submitted them, "editor" dirtied them
        st = s.write(3 * mib + i * 8192, wl.log_text(rng, 8192), comm="kworker/u8:1", pid=77)
        s.dirtier(st, pid=50, comm="editor")
    s.mark("before-crypt")
    for i in range(24):
        s.write(i * 40960, rng.randbytes(16384), comm="crypt", pid=41)
    s.end()
    return s


def test_report_has_its_figures_and_tables(tmp_path, capsys):
    _history(tmp_path)
    store = tmp_path / "store"
    rc, _, err = cli_main(capsys, "ingest", "--log", tmp_path / "log", "--store", store)
    assert rc == 0, err
    out = tmp_path / "rep"
    rc, stdout, err = cli_main(capsys, "report", "--store", store, "--device", "loop7",
                               "--out", out)
    assert rc == 0, err
    page = (out / "report.html").read_text()
    assert stdout.strip() == str(out / "report.html")
    imgs = re.findall(r'<img class="figure" id="fig-(\w+)" alt="[^"]*" '
                      r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [k for k, _ in imgs] == ["rate", "heatmap", "randomness"]
    for _, b64 in imgs:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for cls in ("writers", "files", "episodes", "marks", "gaps"):
        assert f'<table class="{cls}">' in page
    assert "<td>crypt</td>" in page and "<td>postgres</td>" in page
    assert "<td>before-crypt</td>" in page
    # the dirtier beside the submitter
    assert "<td>kworker/u8:1</td><td>77</td><td>editor</td><td>50</td>" in page
    ep = page.split('<table class="episodes">', 1)[1].split("</table>", 1)[0]
    assert "crypt[41]" in ep                    # the episode is in its table
    assert not re.search(r'(src|href)="(?!data:)', page)   # nothing to fetch


def test_report_errors(tmp_path, capsys):
    _history(tmp_path)
    store = tmp_path / "store"
    cli_main(capsys, "ingest", "--log", tmp_path / "log", "--store", store)
    rc, _, err = cli_main(capsys, "report", "--store", store, "--device", "loop7",
                          "--from", "no-such-mark", "--out", tmp_path / "r")
    assert rc != 0 and "no mark 'no-such-mark'" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli_main(capsys, "report", "--store", store, "--device", "loop7",
                          "--from", "before-crypt", "--out", tmp_path / "r2")
    assert rc == 0, err
