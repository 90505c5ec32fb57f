"""Moving a Parquet row group's metadata to where its bytes land in another file.

pyarrow's writer only starts files (it refuses a sink whose position is not 0), so a
row group appended to an existing file is encoded as a one-row-group file in memory,
its column chunks copied to the end of the real file, and its footer's byte offsets
shifted by where they landed. The footer is Thrift's compact protocol; this walks it
and rewrites only the offset fields, copying every other byte as it is.
"""

from __future__ import annotations

from ..exceptions import DualSampleError

# Compact protocol type codes.
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)

# parquet.thrift: the struct reached through each (struct, field id), and the i64 fields
# that are absolute file offsets.
_FILE_METADATA, _ROW_GROUP, _COLUMN_CHUNK, _COLUMN_METADATA = (
    "FileMetaData",
    "RowGroup",
    "ColumnChunk",
    "ColumnMetaData",
)
_CHILD = {
    (_FILE_METADATA, 4): _ROW_GROUP,  # row_groups
    (_ROW_GROUP, 1): _COLUMN_CHUNK,  # columns
    (_COLUMN_CHUNK, 3): _COLUMN_METADATA,  # meta_data
}
_OFFSETS = {
    (_ROW_GROUP, 5),  # file_offset
    (_COLUMN_CHUNK, 2),  # file_offset
    (_COLUMN_CHUNK, 4),  # offset_index_offset
    (_COLUMN_CHUNK, 6),  # column_index_offset
    (_COLUMN_METADATA, 9),  # data_page_offset
    (_COLUMN_METADATA, 10),  # index_page_offset
    (_COLUMN_METADATA, 11),  # dictionary_page_offset
    (_COLUMN_METADATA, 14),  # bloom_filter_offset
}


class FooterError(DualSampleError):
    """A Parquet footer that is not the Thrift this module reads."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Walker:
    def __init__(self, data: bytes, shift: int) -> None:
        self.data, self.pos, self.shift = data, 0, shift
        self.out = bytearray()

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise FooterError("Parquet footer: truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = value = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def copy_from(self, start: int) -> None:
        self.out += self.data[start : self.pos]

    def skip(self, kind: int, struct: str | None) -> None:
        """Copy one value of `kind` to the output (rewriting inside `struct` if named)."""
        start = self.pos
        if kind in (_TRUE, _FALSE):
            pass  # a field's bool lives in its header; a list's in one byte (read by the list)
        elif kind == _BYTE:
            self.byte()
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.pos += 8
        elif kind == _BINARY:
            length = self.varint()  # read before `pos` is: `pos += varint()` would add to the old pos
            self.pos += length
        elif kind in (_LIST, _SET):
            header = self.byte()
            size, elem = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            self.copy_from(start)
            for _ in range(size):
                if elem in (_TRUE, _FALSE):
                    start = self.pos
                    self.byte()
                    self.copy_from(start)
                else:
                    self.skip(elem, struct)
            return
        elif kind == _MAP:
            size = self.varint()
            types = self.byte() if size else 0
            self.copy_from(start)
            for _ in range(size):
                self.skip(types >> 4, None)
                self.skip(types & 0x0F, None)
            return
        elif kind == _STRUCT:
            self.struct(struct)
            return
        else:
            raise FooterError(f"Parquet footer: unknown Thrift type {kind}")
        if self.pos > len(self.data):
            raise FooterError("Parquet footer: truncated")
        self.copy_from(start)

    def struct(self, name: str | None) -> None:
        field = 0
        while True:
            start = self.pos
            header = self.byte()
            if header == 0:
                self.copy_from(start)
                return
            delta, kind = header >> 4, header & 0x0F
            if delta:
                field += delta
            else:
                raw = self.varint()
                field = (raw >> 1) ^ -(raw & 1)
            if name is not None and kind == _I64 and (name, field) in _OFFSETS:
                self.copy_from(start)
                raw = self.varint()
                value = ((raw >> 1) ^ -(raw & 1)) + self.shift
                self.out += _varint((value << 1) ^ (value >> 63))
                continue
            self.copy_from(start)
            self.skip(kind, _CHILD.get((name, field)) if name is not None else None)


def shift_offsets(footer: bytes, shift: int) -> bytes:
    """The serialized FileMetaData `footer` with every absolute file offset moved by `shift`."""
    walker = _Walker(footer, shift)
    walker.struct(_FILE_METADATA)
    if walker.pos != len(footer):
        raise FooterError("Parquet footer: bytes after the metadata")
    return bytes(walker.out)
