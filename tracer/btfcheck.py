"""Check that the compiled BPF object lays out records as Python decodes them.

The BPF programs write `struct br_rec`; Python decodes blkrewind.formats.record.HEADER.
Both come from blkrewind/formats/record.py, but a stale object, another compiler or a
hand edit could still disagree, and then every record would be misread. So
before loading, the loader reads the object's BTF (the .BTF ELF section, read
with pyelftools) and compares struct br_rec member by member: name, byte
offset, size and element count. Any difference refuses the load.

BTF format: linux/Documentation/bpf/btf.rst (header, type section, strings).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from blkrewind.formats import record

BTF_MAGIC = 0xEB9F
# kinds
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_EXTRA = {INT: lambda vlen: 4, ARRAY: lambda vlen: 12, STRUCT: lambda vlen: 12 * vlen,
          UNION: lambda vlen: 12 * vlen, ENUM: lambda vlen: 8 * vlen,
          FUNC_PROTO: lambda vlen: 8 * vlen, VAR: lambda vlen: 4, DATASEC: lambda vlen: 12 * vlen,
          DECL_TAG: lambda vlen: 4, ENUM64: lambda vlen: 12 * vlen}


class LayoutMismatch(Exception):
    pass


@dataclass
class BtfType:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    extra: bytes


class Btf:
    def __init__(self, data: bytes):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data, 0)
        if magic != BTF_MAGIC:
            raise LayoutMismatch("the object's .BTF section has a bad magic")
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[BtfType | None] = [None]  # type ids start at 1
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, st = struct.unpack_from("<III", data, pos)
            pos += 12
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            n = _EXTRA.get(kind, lambda v: 0)(vlen)
            self.types.append(BtfType(kind, self.name(name_off), st, vlen, bool(info >> 31),
                                      data[pos:pos + n]))
            pos += n

    def name(self, off: int) -> str:
        end = self.strings.index(b"\0", off)
        return self.strings[off:end].decode()

    def type(self, tid: int) -> BtfType:
        t = self.types[tid]
        if t is None:
            raise LayoutMismatch("BTF type id 0 (void) where a type is expected")
        return t

    def resolve(self, tid: int) -> BtfType:
        t = self.type(tid)
        while t.kind in (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG):
            t = self.type(t.size_or_type)
        return t

    def sizeof(self, tid: int) -> tuple[int, int]:
        """(total bytes, element count: 1 unless an array)"""
        t = self.resolve(tid)
        if t.kind == ARRAY:
            elem, _idx, nelems = struct.unpack_from("<III", t.extra)
            esize, _ = self.sizeof(elem)
            return esize * nelems, nelems
        if t.kind in (INT, STRUCT, UNION, ENUM, FLOAT, ENUM64):
            return t.size_or_type, 1
        if t.kind == PTR:
            return 8, 1
        raise LayoutMismatch(f"unexpected BTF kind {t.kind}")

    def find_struct(self, name: str) -> BtfType:
        for t in self.types[1:]:   # all set (only id 0 is None)
            if t is not None and t.kind == STRUCT and t.name == name:
                return t
        raise LayoutMismatch(f"struct {name} is not in the object's BTF")

    def sizeof_struct(self, name: str) -> int:
        return self.find_struct(name).size_or_type

    def struct_members(self, name: str) -> list[tuple[str, int, int, int]]:
        t = self.find_struct(name)
        out = []
        for i in range(t.vlen):
            mname, mtype, moff = struct.unpack_from("<III", t.extra, 12 * i)
            bit_off = moff & 0xFFFFFF if t.kind_flag else moff
            if bit_off % 8:
                raise LayoutMismatch(f"{name}.{self.name(mname)} is a bit field")
            size, count = self.sizeof(mtype)
            out.append((self.name(mname), bit_off // 8, size, count))
        return out


def object_btf(path: str) -> Btf:
    with open(path, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".BTF")
        if sec is None:
            raise LayoutMismatch(f"{path} has no .BTF section (built without -g?)")
        return Btf(sec.data())


def expected_members() -> list[tuple[str, int, int, int]]:
    sizes = {"u64": 8, "u32": 4, "u16": 2, "u8": 1, "char": 1}
    return [(n, record.OFFSETS[n], sizes[t] * c, c) for n, t, c in record.FIELDS]


def check_record_layout(path: str) -> None:
    """Raise LayoutMismatch unless the object's struct br_rec equals record.FIELDS."""
    got = object_btf(path).struct_members("br_rec")
    want = expected_members()
    if got != want:
        diffs = [f"{g} != {w}" for g, w in zip(got, want) if g != w]
        if len(got) != len(want):
            diffs.append(f"{len(got)} members in the object, {len(want)} in record.py")
        raise LayoutMismatch("the BPF object's struct br_rec does not match blkrewind/formats/record.py: "
                             + "; ".join(diffs[:3]) + " (rebuild with: python bpf/build.py --force)")
