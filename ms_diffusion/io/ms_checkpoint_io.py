"""Reading MindSpore .ckpt files into numpy one entry at a time, skipping the entries not asked for.

``mindspore.load_checkpoint`` reads the whole file into one bytes object and parses it as a single protobuf
message, so reading even one entry (``choice_func``) costs the whole file's time and about twice its size in
memory, and a full load holds the file's bytes, the parsed message and the tensors at once. The format is a
sequence of protobuf ``Checkpoint.value`` entries (MindSpore's ``checkpoint.proto``)::

    Value  {1: tag (string), 2: tensor {1: dims (int64, repeated), 2: tensor_type (string),
                                        3: tensor_content (bytes)}, 3: maptensor}

each ending where the next begins. Tensors over 512 MB are written as consecutive entries of the same tag,
each holding a slice of the bytes and the whole tensor's dims. Here each entry's header is read, the content
of a wanted entry is read straight into its array and any other content is skipped with a seek.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Optional, Tuple, Union

import numpy as np

from ms_diffusion.io.safetensors_io import bfloat16_to_float32

__all__ = ["read_ms_checkpoint_entries"]

_DTYPES = {"Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
           "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Float16": np.float16,
           "Float32": np.float32, "Float64": np.float64, "Bool": np.bool_, "BFloat16": np.uint16}
_CRC_TAIL = 17                     # b"crc_num" + 10 bytes, written by save_checkpoint(crc_check=True)
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Reader:
    """Protobuf wire-format reads from a file, with the offset kept by hand (no tell() per byte)."""

    def __init__(self, f: BinaryIO, end: int):
        self.f, self.pos, self.end = f, 0, end

    def bytes(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise ValueError(f"an entry runs past the end of the file at byte {self.pos} (the file is cut short)")
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError(f"short read at byte {self.pos} (the file changed while being read?)")
        self.pos += n
        return data

    def varint(self) -> int:
        shift = value = 0
        while True:
            byte = self.bytes(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError(f"a malformed varint at byte {self.pos}")

    def key(self) -> Tuple[int, int]:
        key = self.varint()
        return key >> 3, key & 7

    def seek(self, pos: int) -> None:
        if pos > self.end:
            raise ValueError(f"an entry runs past the end of the file ({pos} > {self.end} bytes): the file is cut short")
        self.f.seek(pos)
        self.pos = pos

    def skip(self, wire: int) -> None:
        if wire == _VARINT:
            self.varint()
        elif wire == _LEN:
            self.seek(self.pos + self.varint())
        elif wire in (_I64, _I32):
            self.seek(self.pos + (8 if wire == _I64 else 4))
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {self.pos}: not a MindSpore checkpoint")


def _entry(r: _Reader, end: int) -> Tuple[str, list, str, int, int]:
    """(tag, dims, tensor_type, content offset, content length) of the Value ending at byte ``end``."""
    tag, dims, kind, content = None, [], None, (r.pos, 0)
    while r.pos < end:
        field, wire = r.key()
        if field == 1 and wire == _LEN:
            tag = r.bytes(r.varint()).decode("utf-8")
        elif field == 2 and wire == _LEN:
            tensor_end = r.varint() + r.pos
            while r.pos < tensor_end:
                f, w = r.key()
                if f == 1 and w == _VARINT:
                    dims.append(r.varint())
                elif f == 1 and w == _LEN:                  # packed dims
                    packed_end = r.varint() + r.pos
                    while r.pos < packed_end:
                        dims.append(r.varint())
                elif f == 2 and w == _LEN:
                    kind = r.bytes(r.varint()).decode("utf-8")
                elif f == 3 and w == _LEN:
                    n = r.varint()
                    content = (r.pos, n)
                    r.seek(r.pos + n)
                else:
                    r.skip(w)
        elif field == 3:
            raise ValueError(f"entry {tag!r} is a map tensor, which ms_diffusion does not read")
        else:
            r.skip(wire)
    if r.pos != end or tag is None or kind is None:
        raise ValueError(f"a malformed entry ending at byte {end}: not a MindSpore checkpoint, or a damaged one")
    return tag, [d - 2**64 if d >= 2**63 else d for d in dims], kind, content[0], content[1]


def read_ms_checkpoint_entries(path: Union[str, Path], want: Optional[Callable[[str], bool]] = None
                               ) -> Dict[str, Union[np.ndarray, str]]:
    """{tag: array (or str, for MindSpore's string entries)} of the entries of a MindSpore .ckpt file for which
    ``want(tag)`` holds (all by default), in file order, as ``mindspore.load_checkpoint`` reads them: a scalar
    is written with dims [0]; bfloat16 becomes float32.

    Raises ValueError naming the problem for a file that is not a checkpoint, is cut short or holds a type
    numpy cannot represent.
    """
    out: Dict[str, Union[np.ndarray, str]] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = size
        if size >= _CRC_TAIL:
            f.seek(size - _CRC_TAIL)
            if f.read(7) == b"crc_num":
                end = size - _CRC_TAIL
            f.seek(0)
        r = _Reader(f, end)
        filled: Dict[str, int] = {}              # bytes of a (sliced) tensor read so far
        bf16 = set()
        while r.pos < end:
            field, wire = r.key()
            if field != 1 or wire != _LEN:
                raise ValueError(f"byte {r.pos}: protobuf field {field} (wire type {wire}) where a checkpoint entry "
                                 f"should start: not a MindSpore checkpoint")
            value_end = r.varint() + r.pos
            if value_end > end:
                raise ValueError(f"an entry runs past the end of the file ({value_end} > {end} bytes): the file is "
                                 f"cut short")
            tag, dims, kind, offset, length = _entry(r, value_end)
            if want is not None and not want(tag):
                continue
            if kind == "str":
                f.seek(offset)
                data = f.read(length)
                out[tag] = str(np.frombuffer(data, f"U{length // 4}")[0]) if length else ""
                f.seek(r.pos)
                continue
            if kind not in _DTYPES:
                raise ValueError(f"entry {tag!r} is {kind}, which numpy cannot hold")
            array = out[tag] if tag in filled and filled[tag] < out[tag].nbytes else None   # its next slice
            if array is None:
                itemsize = np.dtype(_DTYPES[kind]).itemsize
                shape = () if dims == [0] and length == itemsize else tuple(dims)
                if min(shape, default=0) < 0 or int(np.prod(shape, dtype=np.float64)) * itemsize > size:
                    raise ValueError(f"entry {tag!r}: dims {dims} of {kind} do not fit the file's {size} bytes "
                                     f"(a damaged file)")
                array = np.empty(shape, _DTYPES[kind])
                out[tag], filled[tag] = array, 0
                if kind == "BFloat16":
                    bf16.add(tag)
            start = filled[tag]
            if start + length > array.nbytes:
                raise ValueError(f"entry {tag!r} holds more bytes than its dims {dims} of {kind} allow")
            if length:
                f.seek(offset)
                view = memoryview(array.reshape(-1).view(np.uint8))[start:start + length]
                if f.readinto(view) != length:
                    raise ValueError(f"entry {tag!r}: short read (the file changed while being read?)")
                f.seek(r.pos)
            filled[tag] = start + length
        for tag, n in filled.items():
            array = out[tag]
            if n != array.nbytes:
                raise ValueError(f"entry {tag!r} holds {n} of its {array.nbytes} bytes: the file is cut short or "
                                 f"damaged")
        for tag in bf16:
            out[tag] = bfloat16_to_float32(out[tag])
    return out
