"""Root-RAM accessors: read/write by GPA and the host address of a GPA (for
Unicorn's mem_map_ptr, so guest and root see the same bytes)."""

import ctypes
import mmap
import os
import struct


class MmapRam:
    """Root RAM backed by an existing mmap whose offset 0 is GPA 0."""

    def __init__(self, mm, size):
        self._mm = mm
        self.size = size
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(mm))

    def _check(self, gpa, n):
        if gpa < 0 or n < 0 or gpa + n > self.size:
            raise ValueError("GPA range 0x%x+0x%x outside root RAM (0x%x)" % (gpa, n, self.size))

    def contains(self, gpa, n=1):
        return 0 <= gpa and gpa + n <= self.size

    def read(self, gpa, n):
        self._check(gpa, n)
        return self._mm[gpa:gpa + n]

    def write(self, gpa, data):
        data = bytes(data)
        self._check(gpa, len(data))
        self._mm[gpa:gpa + len(data)] = data

    def host_pointer(self, gpa):
        self._check(gpa, 1)
        return self._base + gpa

    # small helpers
    def read_u64(self, gpa):
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u64(self, gpa, v):
        self.write(gpa, struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF))

    def read_u32(self, gpa):
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def write_u32(self, gpa, v):
        self.write(gpa, struct.pack("<I", v & 0xFFFFFFFF))

    def fill(self, gpa, n, byte=0):
        self.write(gpa, bytes([byte]) * n)


class AnonRam(MmapRam):
    """Anonymous zero-filled RAM of `size` bytes (unit tests)."""

    def __init__(self, size):
        mm = mmap.mmap(-1, size)
        super().__init__(mm, size)


class FileRam(MmapRam):
    """Guest RAM shared through a file (the QEMU run): file offset == GPA for
    GPAs below 3 GiB. `size` defaults to the file size."""

    def __init__(self, path, size=None):
        fd = os.open(path, os.O_RDWR)
        try:
            if size is None:
                size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        super().__init__(mm, size)
        self.path = path
