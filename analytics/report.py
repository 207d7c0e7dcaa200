"""`blkrewind report`: one self-contained HTML page about a device's history (figures as PNG
data URIs, inline CSS; nothing to fetch), made with matplotlib's Agg backend.

Figures (time on the x axis, marks as dashed lines, gap windows grey, suspect episodes red):
  1. write rate by process (MB/s, stacked, the top processes and "other"; a write counts for
     the process that dirtied its pages when known, else its submitter)
  2. where the writes went: LBA (MiB into the device) x time, bytes per cell (log colour)
  3. randomness of the data written (byte-weighted mean per time bin, 0..1)
Tables: top writers (submitter and dirtier side by side), most written regions (or files
when a file map is given), suspect episodes, marks, gaps.

Everything is aggregated in DuckDB (time x process and time x LBA bins) over the public
`writes` view (analytics/views.py; one row per bio), restricted to the device's sessions.
"""
from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone

import numpy as np

TIME_BINS = 120
LBA_BINS = 128
TOP_PROCS = 6


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _dt(ns) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).astimezone()


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _size(n) -> str:
    n = float(n or 0)
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or u == "TiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(title: str, cols: list[str], rows: list[tuple], cls: str) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    if not rows:
        body = f'<tr><td colspan="{len(cols)}" class="none">none</td></tr>'
    return (f'<h2>{_esc(title)}</h2><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def collect(store, device, t_from: int | None, t_to: int | None) -> dict:
    """What the page shows, from the store (a Store or RemoteStore). Writes are read through
    the public `writes` view (analytics/views.py: one row per bio, its submitter and, for a
    buffered write traced with --dirtier, the process that dirtied its pages)."""
    from blkrewind.analytics.views import view_of

    sp = store.sessions_of_device(device.device)
    if not sp:
        return {"empty": True}
    sk = ", ".join("?" * len(sp))
    wv = (f"WITH w AS (SELECT *, epoch_us(time) * 1000 AS time_ns, "
          f"coalesce(dirty_comm, comm) AS writer FROM ({view_of(store, 'writes')}) "
          f"WHERE session IN ({sk}) AND device = ?) ")
    wp0 = [*sp, device.device]
    lo, hi = store.query_one(wv + "SELECT min(time_ns), max(time_ns) FROM w", wp0)
    if lo is None:
        return {"empty": True}
    lo = int(t_from if t_from is not None else lo)
    hi = int(t_to if t_to is not None else hi)
    if hi <= lo:
        hi = lo + 1
    width = max(1, -(-(hi - lo) // TIME_BINS))
    w = "w.time_ns BETWEEN ? AND ?"
    wp = [*wp0, lo, hi]
    ops = "w.op = 'write'"
    # top writers: the submitter and, beside it, the process that dirtied the pages
    procs = store.query(
        wv + f"SELECT w.comm, any_value(w.pid), w.dirty_comm, any_value(w.dirty_pid), "
        f"sum(w.captured), count(*), sum(w.randomness * w.captured) / "
        f"nullif(sum(CASE WHEN w.randomness IS NOT NULL THEN w.captured END), 0) "
        f"FROM w WHERE {w} AND {ops} GROUP BY w.comm, w.dirty_comm ORDER BY 5 DESC", wp)
    writers = store.query(
        wv + f"SELECT w.writer, sum(w.captured) FROM w WHERE {w} AND {ops} GROUP BY 1 "
        f"ORDER BY 2 DESC", wp)
    top = [p[0] for p in writers[:TOP_PROCS]]
    rate = store.query(
        wv + f"SELECT (w.time_ns - ?) // ? AS b, CASE WHEN w.writer IN "
        f"({','.join(['?'] * len(top)) or 'NULL'}) THEN w.writer ELSE 'other' END AS c, "
        f"sum(w.captured) FROM w WHERE {w} AND {ops} GROUP BY ALL",
        [*wp0, lo, width, *top, lo, hi])
    size = max(int(device.size_bytes or 1), 1)
    lba_w = max(1, -(-size // LBA_BINS))
    heat = store.query(
        wv + f"SELECT (w.time_ns - ?) // ? AS b, least(w.sector * 512 // ?, ?) AS l, "
        f"sum(CASE WHEN w.op = 'write' THEN w.captured ELSE w.length END) FROM w "
        f"WHERE {w} AND w.op NOT IN ('flush', 'none') GROUP BY ALL",
        [*wp0, lo, width, lba_w, LBA_BINS - 1, lo, hi])
    rnd = store.query(
        wv + f"SELECT (w.time_ns - ?) // ? AS b, sum(w.randomness * w.captured) / "
        f"sum(w.captured), sum(w.captured) FROM w WHERE {w} AND {ops} "
        f"AND w.randomness IS NOT NULL AND w.captured > 0 GROUP BY ALL",
        [*wp0, lo, width, lo, hi])
    regions = store.query(
        wv + f"SELECT w.sector * 512 // 1048576 AS mib, sum(w.captured), count(*), "
        f"string_agg(DISTINCT w.writer, ', ') FROM w WHERE {w} AND {ops} GROUP BY ALL "
        f"ORDER BY 2 DESC LIMIT 15", wp)
    marks = store.query(
        f"SELECT name, epoch_us(time) * 1000, stamp FROM ({view_of(store, 'marks')}) "
        f"WHERE session IN ({sk}) AND epoch_us(time) * 1000 BETWEEN ? AND ? ORDER BY stamp",
        [*sp, lo, hi])
    gaps = store.query(
        f"SELECT epoch_us(time) * 1000, coalesce(epoch_us(resumed_time) * 1000, ?), stamp, "
        f"resumed, cause, missing FROM ({view_of(store, 'gaps')}) WHERE session IN ({sk}) "
        f"AND device = ? AND coalesce(epoch_us(resumed_time) * 1000, ?) >= ? "
        f"AND epoch_us(time) * 1000 <= ? ORDER BY stamp", [hi, *sp, device.device, hi, lo, hi])
    from blkrewind.replayer import detector
    eps = [e for e in detector.scan_device(store, device.device)
           if e.last_ns >= lo and e.first_ns <= hi]
    clean = [detector.clean_point(store, e) for e in eps]
    return {"empty": False, "lo": lo, "hi": hi, "width": width, "procs": procs, "top": top,
            "writers": writers,
            "rate": rate, "heat": heat, "lba_w": lba_w, "rnd": rnd, "regions": regions,
            "marks": marks, "gaps": gaps, "episodes": list(zip(eps, clean)), "size": size}


def _decorate(ax, d: dict, band: bool = False) -> None:
    """Marks, gaps and episodes on a time axis (band: as a strip along the top, so they do
    not cover the heatmap's cells)."""
    span = {"ymin": 0.96, "ymax": 1.0} if band else {}
    for name, t, _ in d["marks"]:
        ax.axvline(_dt(t), color="tab:blue", ls="--", lw=0.8)
        ax.annotate(name, (_dt(t), 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color="tab:blue")
    for a, b, *_ in d["gaps"]:
        ax.axvspan(_dt(a), _dt(b), color="grey", alpha=0.3, lw=0, zorder=0, **span)
    for ep, _ in d["episodes"]:
        ax.axvspan(_dt(ep.first_ns), _dt(max(ep.last_ns, ep.first_ns + d["width"])),
                   color="red", alpha=0.8 if band else 0.15, lw=0, zorder=0, **span)


def figures(d: dict) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    lo, width = d["lo"], d["width"]
    nb = max(1, int((d["hi"] - lo) // width) + 1)
    t_edges = [_dt(lo + i * width) for i in range(nb + 1)]
    t_mid = [_dt(lo + i * width + width // 2) for i in range(nb)]
    out = {}
    fmt = mdates.ConciseDateFormatter(mdates.AutoDateLocator())

    # 1. write rate by process
    names = d["top"] + (["other"] if any(c == "other" for _, c, _ in d["rate"]) else [])
    series = {n: np.zeros(nb) for n in names}
    for b, c, n in d["rate"]:
        if 0 <= int(b) < nb and c in series:
            series[c][int(b)] += float(n)
    fig, ax = plt.subplots(figsize=(11, 3.4))
    if names:
        # datetimes on x: matplotlib converts them; its stubs type x as numbers only
        ax.stackplot(t_mid, *[series[n] / (width / 1e9) / 1e6 for n in names],  # type: ignore[arg-type]
                     labels=names, step="mid", alpha=0.85)
        ax.legend(loc="upper left", fontsize=8, ncol=min(len(names), 4))
    ax.set_ylabel("MB/s written")
    ax.set_title("write rate by process")
    ax.xaxis.set_major_formatter(fmt)
    _decorate(ax, d)
    out["rate"] = _png(fig)
    plt.close(fig)

    # 2. LBA x time heatmap
    grid = np.zeros((LBA_BINS, nb))
    for b, lba, n in d["heat"]:
        if 0 <= int(b) < nb:
            grid[int(lba), int(b)] += float(n or 0)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    mib = d["lba_w"] * np.arange(LBA_BINS + 1) / 2**20
    masked = np.ma.masked_less_equal(grid, 0)
    if masked.count():
        m = ax.pcolormesh(mdates.date2num(t_edges), mib, masked, shading="flat", cmap="viridis",
                          norm=LogNorm(vmin=max(masked.min(), 1), vmax=max(masked.max(), 2)))
        fig.colorbar(m, ax=ax, label="bytes written")
    ax.xaxis_date()
    ax.set_ylim(0, d["size"] / 2**20)
    ax.set_ylabel("device offset (MiB)")
    ax.set_title("where the writes went (LBA x time)")
    ax.xaxis.set_major_formatter(fmt)
    _decorate(ax, d, band=True)
    out["heatmap"] = _png(fig)
    plt.close(fig)

    # 3. randomness over time
    r = np.full(nb, np.nan)
    for b, v, _ in d["rnd"]:
        if 0 <= int(b) < nb and v is not None:
            r[int(b)] = float(v)
    fig, ax = plt.subplots(figsize=(11, 2.8))
    ok = ~np.isnan(r)
    ax.plot([t for t, k in zip(t_mid, ok) if k], r[ok], marker=".", ms=4, lw=0.8,  # type: ignore[arg-type]
            color="tab:purple")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("randomness (0..1)")
    ax.set_title("randomness of the data written (byte-weighted)")
    ax.xaxis.set_major_formatter(fmt)
    _decorate(ax, d)
    out["randomness"] = _png(fig)
    plt.close(fig)
    return out


CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
h2{font-size:1.1em;margin-top:1.4em}table{border-collapse:collapse;font-size:0.85em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}th{background:#eee}
td.none{color:#888}img{display:block;max-width:100%;margin:0.6em 0}.legend{font-size:0.85em;color:#555}"""


def render(store, device, t_from: int | None = None, t_to: int | None = None,
           files=None) -> str:
    """The page as a string. files: optional rows (path, bytes, writes, processes) of the most
    written files (replayer/fsmap.py), shown instead of the regions."""
    d = collect(store, device, t_from, t_to)
    title = f"blkrewind report: {device.device}"
    if d["empty"]:
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
                f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"
                f"<p>No writes in this range.</p></body></html>")
    figs = figures(d)
    span = f"{_dt(d['lo']).isoformat(timespec='seconds')} .. {_dt(d['hi']).isoformat(timespec='seconds')}"
    total = sum(int(p[4] or 0) for p in d["procs"])
    parts = [f"<h1>{_esc(title)}</h1><p>{_esc(span)}; {_size(total)} written by "
             f"{len(d['writers'])} process names; {len(d['marks'])} marks, {len(d['gaps'])} gaps, "
             f"{len(d['episodes'])} suspect episodes.</p>",
             '<p class="legend">Dashed blue: marks. Grey: gaps (not restorable). Red: suspect '
             'episodes (compressible data overwritten with random data).</p>']
    for k, alt in (("rate", "write rate by process"), ("heatmap", "LBA x time heatmap"),
                   ("randomness", "randomness over time")):
        parts.append(f'<img class="figure" id="fig-{k}" alt="{alt}" src="{figs[k]}">')
    parts.append(_table("top writers", ["submitted by", "pid (one of)", "dirtied by",
                                        "pid (one of)", "bytes", "writes", "share",
                                        "mean randomness"],
                        [(c, pid, dc, dpid, _size(n), w,
                          f"{100 * (n or 0) / max(total, 1):.1f} %",
                          "" if rr is None else f"{rr:.2f}")
                         for c, pid, dc, dpid, n, w, rr in d["procs"][:15]], "writers"))
    parts.append('<p class="legend">"submitted by": the process that sent the writes to the '
                 'device (a flusher such as kworker or jbd2 for buffered writes); "dirtied '
                 'by": the process that wrote the data into the page cache, when the tracer '
                 'recorded it (trace --dirtier; empty when unknown: O_DIRECT, journal, '
                 'tracing without it). The figures count each write for its dirtier when '
                 'known, else its submitter.</p>')
    if files:
        parts.append(_table("most written files", ["path", "bytes", "writes", "processes"],
                            files, "files"))
    else:
        parts.append(_table("most written regions (1 MiB)", ["offset (MiB)", "bytes", "writes",
                                                             "processes"],
                            [(m, _size(n), w, p) for m, n, w, p in d["regions"]], "files"))
    parts.append(_table("suspect episodes", ["started", "detected", "processes", "replaced",
                                             "writes", "clean stamp", "clean mark"],
                        [(_dt(e.first_ns).isoformat(timespec="milliseconds"),
                          _dt(e.detect_ns).isoformat(timespec="milliseconds"),
                          ", ".join(f"{k} {v >> 10} KiB" for k, v in e.procs.most_common(3)),
                          _size(e.bytes), e.writes, c[0], c[2])
                         for e, c in d["episodes"]], "episodes"))
    parts.append(_table("marks", ["name", "time", "stamp"],
                        [(n, _dt(t).isoformat(timespec="milliseconds"), s)
                         for n, t, s in d["marks"]], "marks"))
    parts.append(_table("gaps", ["from", "until", "first stamp", "resumed at", "cause",
                                 "missing stamps"],
                        [(_dt(a).isoformat(timespec="seconds"), _dt(b).isoformat(timespec="seconds"),
                          s, r, c, n) for a, b, s, r, c, n in d["gaps"]], "gaps"))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def write(out_dir: str, page: str) -> str:
    """DIR/report.html, written whole (temp name, fsync, rename)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return path
