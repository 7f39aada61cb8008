"""A pickle *parser* (never an unpickler) for the tensors of the released Grok-1 checkpoint.

Each `ckpt-0/tensorNNNNN_000` file is a protocol-4 pickle of a numpy array or of a
`__main__.QuantizedWeight8bit(weight=int8 array, scales=bf16 array)`. `pickle.load` on such a
file runs whatever callables the file names, so a file from a torrent could execute code.

This module walks the opcode stream itself and accepts only what an array pickle needs:
the globals `numpy.core.multiarray._reconstruct` (numpy 1 spelling, as released),
`numpy._core.multiarray._reconstruct` (numpy 2), `numpy.ndarray`, `numpy.dtype`,
`ml_dtypes.bfloat16` and the name `__main__.QuantizedWeight8bit` (never imported, never
called). Any other global, opcode or call is refused with `UnsafePickleError` (exit 3). Array
payloads are not read: the parser records the byte offset of each array's data so the caller
can memory-map it.

Every malformed file is an `IntegrityError` (exit 3) naming it: a path that is not, after its
symlinks, a regular file outside /proc and /sys is refused before it is opened (no FIFO can
hang a command); shapes are checked with Python integers against the bytes the file holds
(no overflow); containers nest at most `MAX_DEPTH` deep (no recursion later); big-endian arrays
are refused, for every command alike. Names from the file appear in messages escaped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import struct
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from grokctl.checkpoint.refs import ArrayRef, QuantRef, TensorRef
from grokctl.errors import IntegrityError, UnsafePickleError
from grokctl.paths import shown

# --- the allow-list ----------------------------------------------------------------------------


class _Global:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<global {self.name}>"


_RECONSTRUCT = _Global("_reconstruct")
_NDARRAY = _Global("ndarray")
_DTYPE = _Global("dtype")
_BFLOAT16 = _Global("bfloat16")
_QW8 = _Global("QuantizedWeight8bit")

ALLOWED_GLOBALS: dict[tuple[str, str], _Global] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): _QW8,
}

_DTYPE_CODES = {"f4", "f2", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


class _Mark:
    pass


_MARK = _Mark()


@dataclasses.dataclass
class _BytesRef:
    offset: int
    length: int


class _DtypeStub:
    def __init__(self, spec: Any):
        if spec is _BFLOAT16:
            self.base = np.dtype(ml_dtypes.bfloat16)
        elif isinstance(spec, str) and spec in _DTYPE_CODES:
            self.base = np.dtype(spec)
        else:
            raise ValueError(f"dtype {shown(spec)} is not an array dtype this reader accepts")
        self.byteorder = "="

    def build(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", "|", "=", ">")):
            raise ValueError(f"unexpected dtype state {shown(state)}")
        self.byteorder = state[1]

    def dtype(self) -> np.dtype:
        """The release is little-endian; a big-endian array is refused here, once, for every
        command (byte-swapping it would hand `generate` what `verify` never saw)."""
        if self.byteorder == ">" and self.base.itemsize > 1:
            raise ValueError(
                f"big-endian array ({self.base.newbyteorder('>').str}): the checkpoint format "
                "is little-endian"
            )
        return self.base


class _ArrayStub:
    def __init__(self) -> None:
        self.state: tuple | None = None

    def build(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError("unexpected ndarray state")
        version, shape, dtype, fortran, data = state
        if (
            not isinstance(shape, tuple)
            or len(shape) > MAX_NDIM
            or not all(_is_dim(s) for s in shape)
        ):
            raise ValueError(f"bad array shape {shown(shape)}")
        if not isinstance(dtype, _DtypeStub) or not isinstance(fortran, bool):
            raise ValueError("bad array dtype or order")
        if not isinstance(data, _BytesRef):
            raise ValueError("array data is not raw bytes (object arrays are refused)")
        self.state = (shape, dtype.dtype(), fortran, data)


class _QW8Stub:
    def __init__(self) -> None:
        self.fields: dict[str, Any] | None = None

    def build(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise ValueError("QuantizedWeight8bit state must be {'weight', 'scales'}")
        self.fields = state


MAX_NDIM = 32  # numpy allows 64; a checkpoint array has at most 3
MAX_DEPTH = 16  # nesting of tuples/lists/dicts; an array pickle needs 3
_DIM_MAX = 1 << 62


def _is_dim(s: Any) -> bool:
    return isinstance(s, int) and not isinstance(s, bool) and 0 <= s < _DIM_MAX


# --- the parser -----------------------------------------------------------------------------


class _Reader:
    def __init__(self, fh: BinaryIO, size: int, path: str):
        self.fh = fh
        self.size = size
        self.path = path

    def read(self, n: int) -> bytes:
        if n > self.size - self.fh.tell():
            raise IntegrityError(f"{self.path}: truncated tensor file (ends at byte {self.size})")
        data = self.fh.read(n)
        if len(data) != n:
            raise IntegrityError(f"{self.path}: truncated tensor file (ends at byte {self.size})")
        return data

    def skip(self, n: int) -> int:
        pos = self.fh.tell()
        if pos + n > self.size:
            raise IntegrityError(
                f"{self.path}: truncated tensor file (array data needs {pos + n} bytes, "
                f"file has {self.size})"
            )
        self.fh.seek(n, os.SEEK_CUR)
        return pos

    def line(self) -> str:
        raw = self.fh.readline(256)
        if not raw.endswith(b"\n"):
            raise IntegrityError(f"{self.path}: truncated tensor file")
        return raw[:-1].decode("ascii", "replace")


def _unpack(fmt: str, data: bytes) -> int:
    return int(struct.unpack(fmt, data)[0])


def parse_tensor_file(path: str | os.PathLike[str]) -> TensorRef:
    """Parse one tensor pickle; return where its array bytes are. Reads no array data."""
    path = str(path)
    fh, size = _open_regular(path)
    with fh:
        try:
            result = _parse(_Reader(fh, size, path))
        except (UnsafePickleError, IntegrityError):
            raise
        except (
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            struct.error,
            OverflowError,
            RecursionError,
            MemoryError,
        ) as exc:
            why = shown(str(exc), 300) or type(exc).__name__
            raise IntegrityError(f"{path}: not a valid tensor pickle ({why})") from None
        end = fh.tell()
    if end != size:
        raise IntegrityError(f"{path}: {size - end} unexpected bytes after the pickle's end")
    return _to_ref(result, path)


_SPECIAL_ROOTS = ("/proc", "/sys")  # kernel files (/dev/shm holds real files: allowed)


def _open_regular(path: str) -> tuple[BinaryIO, int]:
    """Open `path` for reading only when it is (after its symlinks) a regular file outside
    /proc and /sys: a device, FIFO, socket or kernel file is refused before opening."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode) or any(
        real == root or real.startswith(root + "/") for root in _SPECIAL_ROOTS
    ):
        kind = _file_kind(st.st_mode)
        raise IntegrityError(f"{path}: not a regular file ({kind} {shown(real)}); refused")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read ({exc.strerror})") from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise IntegrityError(f"{path}: changed while being opened; refused")
    return os.fdopen(fd, "rb"), opened.st_size


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "kernel file"


def _to_ref(obj: Any, path: str) -> TensorRef:
    if isinstance(obj, _ArrayStub):
        return _array_ref(obj, path)
    if isinstance(obj, _QW8Stub) and obj.fields is not None:
        w, s = obj.fields["weight"], obj.fields["scales"]
        if not isinstance(w, _ArrayStub) or not isinstance(s, _ArrayStub):
            raise IntegrityError(f"{path}: QuantizedWeight8bit fields are not arrays")
        return QuantRef(_array_ref(w, path), _array_ref(s, path))
    raise IntegrityError(f"{path}: pickle holds {type(obj).__name__}, not an array")


def _array_ref(stub: _ArrayStub, path: str) -> ArrayRef:
    if stub.state is None:
        raise IntegrityError(f"{path}: array was never filled in")
    shape, dtype, fortran, data = stub.state
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow before the check
    if nbytes != data.length:
        raise IntegrityError(
            f"{path}: array {shown(shape)} {dtype} needs {nbytes} bytes, pickle holds {data.length}"
        )
    return ArrayRef(path, data.offset, tuple(shape), dtype, fortran)


def _refuse(path: str, what: str, pos: int) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused unsafe pickle: {what} at byte {pos} (a tensor file never needs it)"
    )


def _parse(r: _Reader) -> Any:  # noqa: C901 - one opcode table, read top to bottom
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    path = r.path

    depth: dict[int, tuple[Any, int]] = {}  # id -> (the container, kept alive; its nesting)

    def nested(obj: Any, items: Any, at_least: int = 1) -> Any:
        """Record a container's nesting; refuse beyond MAX_DEPTH (no structure the parser
        builds can then make a later repr or comparison recurse deeply)."""
        d = max(at_least, 1 + max((depth.get(id(x), (None, 0))[1] for x in items), default=0))
        if d > MAX_DEPTH:
            raise ValueError(f"containers nested deeper than {MAX_DEPTH} levels")
        depth[id(obj)] = (obj, d)
        return obj

    def pop_mark() -> list[Any]:
        if not marks:
            raise ValueError("MARK missing")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    while True:
        pos = r.fh.tell()
        op = r.read(1)
        if op == b"\x80":  # PROTO
            proto = r.read(1)[0]
            if proto > 5:
                raise ValueError(f"pickle protocol {proto}")
        elif op == b"\x95":  # FRAME (framing is transparent to a parser)
            r.read(8)
        elif op == b".":  # STOP
            if len(stack) != 1:
                raise ValueError("stack not a single object at STOP")
            return stack[0]
        elif op == b"(":  # MARK
            marks.append(len(stack))
        elif op == b"\x8c":  # SHORT_BINUNICODE
            stack.append(r.read(r.read(1)[0]).decode("utf-8"))
        elif op == b"X":  # BINUNICODE
            stack.append(r.read(_unpack("<I", r.read(4))).decode("utf-8"))
        elif op == b"\x8d":  # BINUNICODE8
            n = _unpack("<Q", r.read(8))
            if n > 1 << 20:
                raise ValueError("string too long")
            stack.append(r.read(n).decode("utf-8"))
        elif op in (
            b"C",
            b"B",
            b"\x8e",
            b"\x96",
        ):  # SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
            width = {b"C": 1, b"B": 4, b"\x8e": 8, b"\x96": 8}[op]
            n = int.from_bytes(r.read(width), "little")
            stack.append(_BytesRef(r.skip(n), n))
        elif op == b"\x94":  # MEMOIZE
            memo[len(memo)] = stack[-1]
        elif op == b"q":  # BINPUT
            memo[r.read(1)[0]] = stack[-1]
        elif op == b"r":  # LONG_BINPUT
            memo[_unpack("<I", r.read(4))] = stack[-1]
        elif op == b"h":  # BINGET
            stack.append(memo[r.read(1)[0]])
        elif op == b"j":  # LONG_BINGET
            stack.append(memo[_unpack("<I", r.read(4))])
        elif op in (b"\x93", b"c"):  # STACK_GLOBAL, GLOBAL
            if op == b"c":
                module, name = r.line(), r.line()
            else:
                name, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise ValueError("STACK_GLOBAL on non-strings")
            glob = ALLOWED_GLOBALS.get((module, name))
            if glob is None:
                raise _refuse(path, f"global {shown(f'{module}.{name}')}", pos)
            stack.append(glob)
        elif op == b"J":  # BININT
            stack.append(_unpack("<i", r.read(4)))
        elif op == b"K":  # BININT1
            stack.append(r.read(1)[0])
        elif op == b"M":  # BININT2
            stack.append(_unpack("<H", r.read(2)))
        elif op == b"\x8a":  # LONG1
            n = r.read(1)[0]
            stack.append(int.from_bytes(r.read(n), "little", signed=True))
        elif op == b"N":
            stack.append(None)
        elif op == b"\x88":
            stack.append(True)
        elif op == b"\x89":
            stack.append(False)
        elif op == b")":
            stack.append(())
        elif op == b"t":
            items = pop_mark()
            stack.append(nested(tuple(items), items))
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            n = op[0] - 0x84
            if len(stack) < n:
                raise ValueError("stack underflow")
            top = tuple(stack[-n:])
            del stack[-n:]
            stack.append(nested(top, top))
        elif op == b"}":
            stack.append(nested({}, ()))
        elif op == b"]":
            stack.append(nested([], ()))
        elif op in (b"s", b"u"):  # SETITEM, SETITEMS
            if op == b"s":
                items = [stack.pop(-2), stack.pop()]
            else:
                items = pop_mark()
            target = stack[-1]
            if not isinstance(target, dict) or len(items) % 2:
                raise ValueError("SETITEMS on a non-dict")
            for k, v in zip(items[::2], items[1::2]):
                if not isinstance(k, str):
                    raise ValueError("non-string dict key")
                target[k] = v
            nested(target, items, depth.get(id(target), (None, 1))[1])
        elif op in (b"a", b"e"):  # APPEND, APPENDS
            items = [stack.pop()] if op == b"a" else pop_mark()
            if not isinstance(stack[-1], list):
                raise ValueError("APPEND on a non-list")
            stack[-1].extend(items)
            nested(stack[-1], items, depth.get(id(stack[-1]), (None, 1))[1])
        elif op == b"R":  # REDUCE: only the two array constructors
            args = stack.pop()
            func = stack.pop()
            if func is _RECONSTRUCT:
                if not (isinstance(args, tuple) and len(args) == 3 and args[0] is _NDARRAY):
                    raise _refuse(path, "_reconstruct of something other than ndarray", pos)
                stack.append(_ArrayStub())
            elif func is _DTYPE:
                if not (isinstance(args, tuple) and len(args) == 3):
                    raise ValueError("bad dtype arguments")
                stack.append(_DtypeStub(args[0]))
            else:
                raise _refuse(path, f"call of {shown(func)}", pos)
        elif op == b"\x81":  # NEWOBJ: only the QuantizedWeight8bit name, never instantiated
            args = stack.pop()
            cls = stack.pop()
            if cls is not _QW8 or args != ():
                raise _refuse(path, f"construction of {shown(cls)}", pos)
            stack.append(_QW8Stub())
        elif op == b"b":  # BUILD
            state = stack.pop()
            target = stack[-1]
            if not isinstance(target, _ArrayStub | _DtypeStub | _QW8Stub):
                raise _refuse(path, f"BUILD on {type(target).__name__}", pos)
            target.build(state)
        else:
            raise _refuse(path, f"opcode {op!r}", pos)
