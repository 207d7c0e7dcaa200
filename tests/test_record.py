"""The one record definition: packing, framing, decoding, and the BTF check against it."""
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkrewind.formats import record as R
from blkrewind.tracer import btfcheck

OBJ = Path(__file__).resolve().parents[1] / "bpf" / "build" / "blkrewind.bpf.o"


def test_header_is_112_bytes_and_8_aligned():
    assert R.HEADER_SIZE == 112 == R.DTYPE.itemsize
    assert R.OFFSETS["stamp"] == 0 and R.OFFSETS["comm"] == 96
    assert R.HEADER_SIZE % 8 == 0


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=300),
                          st.sampled_from([R.R_BIO, R.R_MARK, R.R_BASE]),
                          st.booleans()), max_size=30))
def test_framing_round_trip(items):
    parts = []
    for stamp, payload, rtype, discard in items:
        rec = bytearray(R.make_record(payload, stamp=stamp, rtype=rtype, comm=b"dd"))
        if discard:
            word = int.from_bytes(rec[:4], "little") | R.RB_DISCARD
            rec[:4] = word.to_bytes(4, "little")
        parts.append(bytes(rec))
    span = b"".join(parts)
    assert len(span) % 8 == 0
    got = [(h.stamp, bytes(p), h.rtype, h.comm_str) for h, p in R.iter_records(span)]
    assert got == [(s, p, r, "dd") for s, p, r, d in items if not d]


def test_numpy_dtype_agrees_with_struct():
    import numpy as np
    rec = R.make_record(b"abc", stamp=7, seq=9, sector=123, dev=R.kdev(7, 3), op=R.OP_WRITE,
                        flags=R.F_FUA | R.F_FIRST, comm=b"fio", rtype=R.R_BIO)
    a = np.frombuffer(rec, dtype=R.DTYPE, count=1, offset=8)[0]
    h = R.unpack_header(rec, 8)
    assert (a["stamp"], a["seq"], a["sector"], a["dev"], a["op"], a["len"]) == \
           (h.stamp, h.seq, h.sector, h.dev, h.op, h.len) == (7, 9, 123, (7 << 20) | 3, 1, 3)
    assert R.flag_names(h.flags) == ["FUA", "FIRST"]


@pytest.mark.parametrize("bad", [
    b"\x07\x00\x00\x00\x00\x00\x00\x00",                      # shorter than a header
    (R.RB_BUSY | 200).to_bytes(4, "little") + bytes(4 + 200),  # still being written
    (5000).to_bytes(4, "little") + bytes(100),                 # runs past the span
    b"\x01\x02\x03",                                           # torn prefix
])
def test_bad_spans_raise(bad):
    with pytest.raises(R.CorruptRecords):
        list(R.iter_records(bad))


def test_payload_longer_than_record_raises():
    rec = bytearray(R.make_record(b"x" * 8, rtype=R.R_BIO))
    rec[8 + R.OFFSETS["len"]: 8 + R.OFFSETS["len"] + 4] = (64).to_bytes(4, "little")
    with pytest.raises(R.CorruptRecords):
        list(R.iter_records(bytes(rec)))


def test_generated_c_header_matches_fields():
    text = R.CLayout.header_text()
    for name, ctype, count in R.FIELDS:
        assert f" {name}{'[%d]' % count if count > 1 else ''};" in text
    assert f"#define BR_R_MARK {R.R_MARK}" in text


@pytest.fixture(scope="module")
def built_object():
    if not OBJ.exists():
        pytest.fail("bpf/build/blkrewind.bpf.o is missing: run python bpf/build.py") \
            if os.environ.get("CI") == "true" else pytest.skip("BPF object not built")
    return str(OBJ)


def test_compiled_object_matches_record_py(built_object):
    btfcheck.check_record_layout(built_object)


def test_btf_check_refuses_a_different_layout(built_object, monkeypatch):
    swapped = list(R.FIELDS)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # same sizes, other names at the offsets
    monkeypatch.setattr(R, "FIELDS", swapped)
    with pytest.raises(btfcheck.LayoutMismatch, match="does not match"):
        btfcheck.check_record_layout(built_object)


def test_btf_check_refuses_an_object_compiled_from_another_layout(tmp_path, built_object):
    """Compile a variant whose struct br_rec has one field wider: the loader refuses it."""
    src = (OBJ.parent / "record.h").read_text().replace("__u32 flags;", "__u64 flags;")
    (tmp_path / "record.h").write_text(src)
    (tmp_path / "vmlinux.h").symlink_to(OBJ.parent / "vmlinux.h")
    out = tmp_path / "bad.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86",
                    "-I", str(tmp_path), "-c", str(OBJ.parents[1] / "blkrewind.bpf.c"), "-o", str(out)],
                   check=True, capture_output=True)
    with pytest.raises(btfcheck.LayoutMismatch):
        btfcheck.check_record_layout(str(out))
