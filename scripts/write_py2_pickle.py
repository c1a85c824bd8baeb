"""Write pickles byte by byte the way Python 2's cPickle (protocol 2) wrote the CIFAR archives.

No pickle module is used: each opcode is emitted explicitly, as in the 2009 files
(`cifar-100-python/{train,test,meta}`, `cifar-10-batches-py/*`):

  PROTO 2, EMPTY_DICT, BINPUT/LONG_BINPUT memo after every container and string,
  MARK ... SETITEMS / APPENDS in groups of 1000 (cPickle's BATCHSIZE),
  Python 2 `str` as SHORT_BINSTRING (< 256 bytes) or BINSTRING,
  ints as BININT1 / BININT2 / BININT,
  the numpy array as GLOBAL numpy.core.multiarray._reconstruct (numpy.ndarray, (0,), 'b')
  REDUCE, then BUILD with (1, shape, dtype('u1', 0, 1) + BUILD (3, '|', None, None, None,
  -1, -1, 0), False, raw bytes as BINSTRING).

Used by gen_data_fixtures.py; `write(path, obj)` accepts dict / list / tuple / str (Python 2
str = bytes here) / int / numpy uint8 arrays wrapped in `Array`.
"""
import struct

BATCH = 1000


class Array:
    """A C-contiguous uint8 numpy array to pickle as numpy 1.x under Python 2 did."""

    def __init__(self, arr):
        assert str(arr.dtype) == "uint8" and arr.flags.c_contiguous
        self.arr = arr


class Writer:
    def __init__(self):
        self.out = bytearray()
        self.memo = 1  # cPickle's memo ids in the CIFAR files start at 1

    def put(self):
        i = self.memo
        self.memo += 1
        if i < 256:
            self.out += b"q" + bytes([i])
        else:
            self.out += b"r" + struct.pack("<I", i)

    def string(self, s):
        if isinstance(s, str):
            s = s.encode("latin-1")
        if len(s) < 256:
            self.out += b"U" + bytes([len(s)]) + s
        else:
            self.out += b"T" + struct.pack("<i", len(s)) + s
        self.put()

    def int(self, v):
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        else:
            self.out += b"J" + struct.pack("<i", v)

    def glob(self, module, name):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self.put()

    def array(self, a):
        arr = a.arr
        self.glob("numpy.core.multiarray", "_reconstruct")
        self.glob("numpy", "ndarray")
        self.int(0)
        self.out += b"\x85"  # TUPLE1
        self.put()
        self.string("b")
        self.out += b"\x87"  # TUPLE3
        self.put()
        self.out += b"R"
        self.put()
        # BUILD state: (1, shape, dtype, False, raw)
        self.out += b"("
        self.int(1)
        for d in arr.shape:
            self.int(d)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[arr.ndim]
        self.put()
        self.glob("numpy", "dtype")
        self.string("u1")
        self.int(0)
        self.int(1)
        self.out += b"\x87"
        self.put()
        self.out += b"R"
        self.put()
        self.out += b"("
        self.int(3)
        self.string("|")
        self.out += b"NNN"
        self.out += b"J" + struct.pack("<i", -1)
        self.out += b"J" + struct.pack("<i", -1)
        self.int(0)
        self.out += b"t"
        self.put()
        self.out += b"b"  # BUILD the dtype
        self.out += b"\x89"  # NEWFALSE: not Fortran order
        self.string(arr.tobytes())
        self.out += b"t"
        self.put()
        self.out += b"b"  # BUILD the array

    def value(self, v):
        if isinstance(v, dict):
            self.out += b"}"
            self.put()
            items = list(v.items())
            for i in range(0, len(items), BATCH):
                chunk = items[i : i + BATCH]
                if len(chunk) > 1:
                    self.out += b"("
                for k, x in chunk:
                    self.value(k)
                    self.value(x)
                self.out += b"u" if len(chunk) > 1 else b"s"
        elif isinstance(v, list):
            self.out += b"]"
            self.put()
            for i in range(0, len(v), BATCH):
                chunk = v[i : i + BATCH]
                if len(chunk) > 1:
                    self.out += b"("
                for x in chunk:
                    self.value(x)
                self.out += b"e" if len(chunk) > 1 else b"a"
        elif isinstance(v, (str, bytes)):
            self.string(v)
        elif isinstance(v, bool):
            self.out += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            self.int(v)
        elif isinstance(v, Array):
            self.array(v)
        elif v is None:
            self.out += b"N"
        else:
            raise TypeError(type(v))


def dumps(obj):
    w = Writer()
    w.out += b"\x80\x02"
    w.value(obj)
    w.out += b"."
    return bytes(w.out)


def write(path, obj):
    with open(path, "wb") as f:
        f.write(dumps(obj))
