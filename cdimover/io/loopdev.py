"""Loop devices over backing files, driven by the kernel's ioctls directly.

The seed's local block PersistentVolume is a loop device over a backing file: this module makes
the backing file (sparse, or written with zeros like the seed's `dd if=/dev/zero`), attaches it
with LOOP_CONFIGURE (falling back to LOOP_SET_FD + LOOP_SET_STATUS64 + LOOP_SET_BLOCK_SIZE on
kernels without it), reads a device's state back, detaches exactly the device it is given, and
renders the PersistentVolume manifest that exposes the device to Kubernetes. No `losetup`
subprocess is used. Attaching and detaching need CAP_SYS_ADMIN; `info()` needs only read access
to the device node.

The layouts follow <linux/loop.h>: struct loop_info64 is 232 bytes (five u64, four u32, three
byte arrays of 64, 64 and 32, two u64; no padding) and struct loop_config is 304 bytes (u32 fd,
u32 block_size, struct loop_info64 at offset 8, u64 reserved[8] at offset 240).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import re
import stat
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

from .._native import const
from ..errors import ConfigurationError

__all__ = [
    "LOOP_SET_FD",
    "LOOP_CLR_FD",
    "LOOP_SET_STATUS64",
    "LOOP_GET_STATUS64",
    "LOOP_SET_DIRECT_IO",
    "LOOP_SET_BLOCK_SIZE",
    "LOOP_CONFIGURE",
    "LOOP_CTL_GET_FREE",
    "BLKSSZGET",
    "BLKGETSIZE64",
    "LO_NAME_SIZE",
    "LOOP_MAJOR",
    "LO_FLAGS_READ_ONLY",
    "LO_FLAGS_AUTOCLEAR",
    "LO_FLAGS_PARTSCAN",
    "LO_FLAGS_DIRECT_IO",
    "LoopFlag",
    "LoopInfo",
    "create_backing_file",
    "attach",
    "detach",
    "info",
    "attached",
    "persistent_volume_manifest",
]

StrPath: TypeAlias = "str | os.PathLike[str]"

# ioctl numbers and flags from <linux/loop.h> and <linux/fs.h>, as this machine's compiler saw
# them when the native core was built.
LOOP_SET_FD: Final = const("LOOP_SET_FD")
LOOP_CLR_FD: Final = const("LOOP_CLR_FD")
LOOP_SET_STATUS64: Final = const("LOOP_SET_STATUS64")
LOOP_GET_STATUS64: Final = const("LOOP_GET_STATUS64")
LOOP_SET_DIRECT_IO: Final = const("LOOP_SET_DIRECT_IO")
LOOP_SET_BLOCK_SIZE: Final = const("LOOP_SET_BLOCK_SIZE")
LOOP_CONFIGURE: Final = const("LOOP_CONFIGURE")
LOOP_CTL_GET_FREE: Final = const("LOOP_CTL_GET_FREE")
BLKSSZGET: Final = const("BLKSSZGET")
BLKGETSIZE64: Final = const("BLKGETSIZE64")

LO_NAME_SIZE: Final = const("LO_NAME_SIZE")
LOOP_MAJOR: Final = 7

LO_FLAGS_READ_ONLY: Final = const("LO_FLAGS_READ_ONLY")
LO_FLAGS_AUTOCLEAR: Final = const("LO_FLAGS_AUTOCLEAR")
LO_FLAGS_PARTSCAN: Final = const("LO_FLAGS_PARTSCAN")
LO_FLAGS_DIRECT_IO: Final = const("LO_FLAGS_DIRECT_IO")


class LoopFlag(enum.IntFlag):
    """The lo_flags bits of struct loop_info64."""

    READ_ONLY = LO_FLAGS_READ_ONLY
    AUTOCLEAR = LO_FLAGS_AUTOCLEAR
    PARTSCAN = LO_FLAGS_PARTSCAN
    DIRECT_IO = LO_FLAGS_DIRECT_IO


# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64);
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32); lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32] (u8); lo_init[2] (u64).
_LOOP_INFO64: Final = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size (u32); struct loop_info64 info; __reserved[8] (u64).
_LOOP_CONFIG: Final = struct.Struct(f"=2I{_LOOP_INFO64.size}s8Q")
_U64: Final = struct.Struct("=Q")
_INT: Final = struct.Struct("=i")
assert _LOOP_INFO64.size == 232 and _LOOP_CONFIG.size == 304

# Flags LOOP_SET_STATUS64 accepts; read-only and direct I/O take other routes there.
_STATUS_SETTABLE: Final = LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN

_ATTACH_ATTEMPTS: Final = 16
_ATTACH_BACKOFF: Final = 0.005
_DETACH_ATTEMPTS: Final = 50
_DETACH_INTERVAL: Final = 0.02

_LOOP_CONTROL: Final = "/dev/loop-control"
_SYS_DEV_BLOCK: Final = "/sys/dev/block"
_SYS_BLOCK: Final = "/sys/block"


class _RawInfo(NamedTuple):
    """The fields of struct loop_info64 this module uses."""

    device: int
    inode: int
    offset: int
    sizelimit: int
    number: int
    flags: int
    file_name: str


@dataclass(frozen=True, slots=True)
class LoopInfo:
    """The state of an attached loop device.

    backing_file is the untruncated path from sysfs when readable, else the kernel's lo_file_name
    (at most 63 bytes). backing_device and backing_inode are the backing file's st_dev and st_ino.
    size is the device's size in bytes (BLKGETSIZE64), sector_size its logical block size
    (BLKSSZGET).
    """

    device: str
    backing_file: str
    backing_device: int
    backing_inode: int
    offset: int
    sizelimit: int
    flags: LoopFlag
    read_only: bool
    direct_io: bool
    sector_size: int
    size: int


def _os_error(exc: OSError, what: str, path: str, path2: str | None = None) -> OSError:
    """Rebuild EXC as an OSError of the same errno naming the failed step WHAT and PATH (and
    PATH2); the constructor picks the subclass (FileNotFoundError, PermissionError, ...)."""
    err = exc.errno if exc.errno is not None else errno.EIO
    return OSError(err, f"{os.strerror(err)}: {what}", path, None, path2)


def _check_int(name: str, value: int, *, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value}")


def _check_sector_size(sector_size: int) -> None:
    _check_int("sector_size", sector_size, minimum=512)
    if sector_size & (sector_size - 1) or sector_size > 65536:
        raise ConfigurationError(
            f"sector_size must be a power of two between 512 and 65536, got {sector_size}")


# ---------------------------------------------------------------------------------------------
# Backing files


def create_backing_file(path: StrPath, size: int, *, fill: str = "sparse",
                        overwrite: bool = False) -> None:
    """Create the backing file PATH of exactly SIZE bytes.

    FILL "sparse" extends an empty file with ftruncate (no blocks allocated); "zero" writes
    zeros in 1 MiB chunks and fsyncs, like the seed's `dd if=/dev/zero`. SIZE must be a positive
    multiple of 512 (ConfigurationError, a ValueError). An existing PATH raises FileExistsError
    unless OVERWRITE; only regular files are ever overwritten. A file this call created is
    removed again when filling it fails (ENOSPC, ...).
    """
    p = os.fspath(path)
    _check_int("size", size, minimum=1)
    if size % 512:
        raise ConfigurationError(f"size must be a multiple of 512, got {size}")
    if fill not in ("sparse", "zero"):
        raise ConfigurationError(f"fill must be 'sparse' or 'zero', got {fill!r}")

    base = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    created = True
    try:
        fd = os.open(p, base | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if not overwrite:
            raise FileExistsError(errno.EEXIST, "File exists: refusing to overwrite", p) from None
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "Invalid argument: not a regular file", p) from None
        fd = os.open(p, base | os.O_TRUNC)
        created = False
    try:
        if fill == "sparse":
            os.ftruncate(fd, size)
        else:
            _write_zeros(fd, size)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise
    os.close(fd)


def _write_zeros(fd: int, size: int) -> None:
    """Write SIZE zero bytes to FD from its current offset, 1 MiB at a time."""
    chunk = memoryview(bytes(1 << 20))
    left = size
    while left:
        n = os.write(fd, chunk[:min(left, len(chunk))])
        left -= n


# ---------------------------------------------------------------------------------------------
# Attaching


def _pack_info(*, offset: int, sizelimit: int, flags: int, file_name: bytes) -> bytes:
    """struct loop_info64 with the fields userspace may set; FILE_NAME is cut to 63 bytes."""
    return _LOOP_INFO64.pack(0, 0, 0, offset, sizelimit, 0, 0, 0, flags,
                             file_name[:LO_NAME_SIZE - 1], b"", b"", 0, 0)


def _unpack_info(buf: bytes | bytearray) -> _RawInfo:
    (device, inode, _rdevice, offset, sizelimit, number, _etype, _ksize, flags,
     file_name, _crypt, _key, _init0, _init1) = _LOOP_INFO64.unpack(buf)
    return _RawInfo(device, inode, offset, sizelimit, number, flags,
                    os.fsdecode(file_name.split(b"\0", 1)[0]))


def _loop_configure(dev_fd: int, backing_fd: int, *, block_size: int, info: bytes) -> None:
    """LOOP_CONFIGURE on DEV_FD; raises the bare OSError from the kernel."""
    config = _LOOP_CONFIG.pack(backing_fd, block_size, info, *([0] * 8))
    fcntl.ioctl(dev_fd, LOOP_CONFIGURE, config)


def _legacy_setup(dev_fd: int, backing_fd: int, *, block_size: int, direct_io: bool,
                  info: bytes) -> None:
    """LOOP_SET_FD, LOOP_SET_STATUS64, LOOP_SET_BLOCK_SIZE and LOOP_SET_DIRECT_IO, for kernels
    before 5.8. Read-only follows BACKING_FD's open mode. Undoes LOOP_SET_FD if a later step
    fails; raises the bare OSError from the kernel."""
    fcntl.ioctl(dev_fd, LOOP_SET_FD, backing_fd)
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, info)
        if block_size != 512:
            fcntl.ioctl(dev_fd, LOOP_SET_BLOCK_SIZE, block_size)
        if direct_io:
            fcntl.ioctl(dev_fd, LOOP_SET_DIRECT_IO, 1)
    except OSError:
        with contextlib.suppress(OSError):
            fcntl.ioctl(dev_fd, LOOP_CLR_FD, 0)
        raise


def _setup(dev_fd: int, backing_fd: int, *, block_size: int, read_only: bool, direct_io: bool,
           offset: int, sizelimit: int, file_name: bytes) -> None:
    """Bind BACKING_FD to the loop device DEV_FD: LOOP_CONFIGURE, or the legacy sequence when
    the kernel does not know it (EINVAL or ENOTTY). Raises the bare OSError; EBUSY means another
    process took the device first."""
    flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    try:
        _loop_configure(dev_fd, backing_fd, block_size=block_size,
                        info=_pack_info(offset=offset, sizelimit=sizelimit, flags=flags,
                                        file_name=file_name))
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    _legacy_setup(dev_fd, backing_fd, block_size=block_size, direct_io=direct_io,
                  info=_pack_info(offset=offset, sizelimit=sizelimit,
                                  flags=flags & _STATUS_SETTABLE, file_name=file_name))


def _get_free(ctl_fd: int) -> int:
    """LOOP_CTL_GET_FREE: the number of a free loop device, created by the kernel if needed."""
    return fcntl.ioctl(ctl_fd, LOOP_CTL_GET_FREE)


def _loop_minor(number: int) -> int:
    """The minor number of loop device NUMBER: from sysfs, else computed the way the loop driver
    does (NUMBER << fls(max_part))."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(_SYS_BLOCK, f"loop{number}", "dev"), encoding="ascii") as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
        if major == LOOP_MAJOR:
            return minor
    shift = 0
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/module/loop/parameters/max_part", encoding="ascii") as f:
            max_part = int(f.read().strip())
        if max_part > 0:
            shift = max_part.bit_length()
    return number << shift


def _ensure_node(number: int, dev_dir: str = "/dev") -> str:
    """Return DEV_DIR/loopNUMBER, creating the block node (major 7) if it is missing, as in
    containers whose /dev has no udev or devtmpfs. An existing path must be that very device."""
    path = os.path.join(dev_dir, f"loop{number}")
    rdev = os.makedev(LOOP_MAJOR, _loop_minor(number))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            os.mknod(path, 0o660 | stat.S_IFBLK, rdev)
        except FileExistsError:
            pass  # udev or devtmpfs won the race
        except OSError as e:
            raise _os_error(e, "mknod", path) from None
        st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != rdev:
        raise OSError(errno.ENOTBLK,
                      f"{os.strerror(errno.ENOTBLK)}: expected loop device "
                      f"{LOOP_MAJOR}:{os.minor(rdev)}", path)
    return path


def _open_backing(path: str, *, read_only: bool, direct_io: bool) -> int:
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if direct_io:
        try:
            return os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the file system has no O_DIRECT
                raise
    return os.open(path, flags)


def attach(backing: StrPath, *, sector_size: int = 512, read_only: bool = False,
           direct_io: bool = False, offset: int = 0, sizelimit: int = 0) -> str:
    """Attach BACKING to a free loop device and return its path, "/dev/loopN".

    SECTOR_SIZE is the device's logical block size (a power of two, 512 to 65536). READ_ONLY
    opens BACKING read-only and makes the device read-only. DIRECT_IO asks for direct I/O to the
    backing file; the kernel keeps buffered I/O when the file system cannot do it (see
    `info().direct_io`). OFFSET and SIZELIMIT (0 = to the end) select the window of BACKING the
    device shows. When another process takes the free device first (EBUSY), the next free one is
    tried, a bounded number of times. Raises ConfigurationError (a ValueError) for bad arguments
    and OSError naming the device and the backing path otherwise.
    """
    path = os.fspath(backing)
    _check_sector_size(sector_size)
    _check_int("offset", offset)
    _check_int("sizelimit", sizelimit)
    file_name = os.fsencode(os.path.realpath(path))

    backing_fd = _open_backing(path, read_only=read_only, direct_io=direct_io)
    try:
        try:
            ctl_fd = os.open(_LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _os_error(e, "open", _LOOP_CONTROL) from None
        try:
            return _attach_loop(ctl_fd, backing_fd, path, block_size=sector_size,
                                read_only=read_only, direct_io=direct_io, offset=offset,
                                sizelimit=sizelimit, file_name=file_name)
        finally:
            os.close(ctl_fd)
    finally:
        os.close(backing_fd)


def _attach_loop(ctl_fd: int, backing_fd: int, path: str, *, block_size: int, read_only: bool,
                 direct_io: bool, offset: int, sizelimit: int, file_name: bytes) -> str:
    """The retry loop of attach(): GET_FREE, open the node, configure; EBUSY means retry."""
    for attempt in range(_ATTACH_ATTEMPTS):
        if attempt:
            time.sleep(_ATTACH_BACKOFF * attempt)
        try:
            number = _get_free(ctl_fd)
        except OSError as e:
            raise _os_error(e, "LOOP_CTL_GET_FREE", _LOOP_CONTROL) from None
        device = _ensure_node(number)
        try:
            dev_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.ENODEV):  # removed meanwhile (LOOP_CTL_REMOVE)
                continue
            raise _os_error(e, "open", device) from None
        try:
            _setup(dev_fd, backing_fd, block_size=block_size, read_only=read_only,
                   direct_io=direct_io, offset=offset, sizelimit=sizelimit,
                   file_name=file_name)
        except OSError as e:
            if e.errno == errno.EBUSY:
                continue
            raise _os_error(e, "LOOP_CONFIGURE", device, path) from None
        finally:
            os.close(dev_fd)
        return device
    raise OSError(errno.EBUSY,
                  f"{os.strerror(errno.EBUSY)}: no free loop device after "
                  f"{_ATTACH_ATTEMPTS} attempts", path)


# ---------------------------------------------------------------------------------------------
# Inspecting and detaching


def _open_loop(path: str) -> tuple[int, int]:
    """Open the loop device PATH read-only; return (fd, st_rdev). Anything that is not a block
    device of major 7 is refused before (non-block) or right after (other majors) opening."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise OSError(errno.ENOTBLK, os.strerror(errno.ENOTBLK), path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
        os.close(fd)
        raise OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: not a loop device", path)
    return fd, st.st_rdev


def _sysfs_loop_dir(rdev: int) -> str:
    return os.path.join(_SYS_DEV_BLOCK, f"{os.major(rdev)}:{os.minor(rdev)}", "loop")


def info(device: StrPath) -> LoopInfo:
    """Read the state of the attached loop device DEVICE.

    Raises OSError with the path: ENXIO when nothing is attached, ENOTBLK or EINVAL when DEVICE
    is not a loop device.
    """
    path = os.fspath(device)
    fd, rdev = _open_loop(path)
    try:
        buf = bytearray(_LOOP_INFO64.size)
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
        except OSError as e:
            raise _os_error(e, "LOOP_GET_STATUS64", path) from None
        raw = _unpack_info(buf)
        ssz = bytearray(_INT.size)
        size = bytearray(_U64.size)
        try:
            fcntl.ioctl(fd, BLKSSZGET, ssz, True)
            fcntl.ioctl(fd, BLKGETSIZE64, size, True)
        except OSError as e:
            raise _os_error(e, "BLKSSZGET/BLKGETSIZE64", path) from None
    finally:
        os.close(fd)

    backing = raw.file_name
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(os.path.join(_sysfs_loop_dir(rdev), "backing_file"), "rb") as f:
            text = f.read()
        if text.endswith(b"\n"):
            text = text[:-1]
        if text:
            backing = os.fsdecode(text)
    flags = LoopFlag(raw.flags)
    return LoopInfo(
        device=path, backing_file=backing, backing_device=raw.device, backing_inode=raw.inode,
        offset=raw.offset, sizelimit=raw.sizelimit, flags=flags,
        read_only=LoopFlag.READ_ONLY in flags, direct_io=LoopFlag.DIRECT_IO in flags,
        sector_size=_INT.unpack(ssz)[0], size=_U64.unpack(size)[0])


def detach(device: StrPath) -> None:
    """Detach the loop device DEVICE (LOOP_CLR_FD on exactly that device).

    A device with nothing attached (ENXIO) is left alone silently. EBUSY is retried briefly.
    The kernel completes the detach when the last opener closes the device; when another process
    (udev's blkid, a reader) still holds it, this waits up to about a second for that and then
    returns, the device being marked to clear itself on that last close. Raises OSError with the
    path for anything else, including a DEVICE that is not a loop device.
    """
    path = os.fspath(device)
    fd, rdev = _open_loop(path)
    try:
        for attempt in range(_DETACH_ATTEMPTS):
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
                break
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                if e.errno != errno.EBUSY or attempt == _DETACH_ATTEMPTS - 1:
                    raise _os_error(e, "LOOP_CLR_FD", path) from None
            time.sleep(_DETACH_INTERVAL)
    finally:
        os.close(fd)  # our close is the last one in the common case: the kernel clears here
    bound = _sysfs_loop_dir(rdev)
    for _ in range(_DETACH_ATTEMPTS):
        if not os.path.exists(bound):
            return
        time.sleep(_DETACH_INTERVAL)


@contextlib.contextmanager
def attached(backing: StrPath, *, sector_size: int = 512, read_only: bool = False,
             direct_io: bool = False, offset: int = 0, sizelimit: int = 0) -> Iterator[str]:
    """Attach BACKING like attach(), yield the device path, and always detach it afterwards,
    also when the body raises."""
    device = attach(backing, sector_size=sector_size, read_only=read_only, direct_io=direct_io,
                    offset=offset, sizelimit=sizelimit)
    try:
        yield device
    finally:
        detach(device)


# ---------------------------------------------------------------------------------------------
# The PersistentVolume


_DNS1123_LABEL: Final = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN: Final = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_QUANTITY: Final = re.compile(
    r"\+?(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?")
_BINARY_SUFFIXES: Final = (("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20),
                           ("Ki", 10))
_ACCESS_MODES: Final = frozenset({"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany",
                                  "ReadWriteOncePod"})
_RECLAIM_POLICIES: Final = frozenset({"Retain", "Delete", "Recycle"})


def _check_subdomain(what: str, name: str) -> None:
    if not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise ConfigurationError(
            f"{what} {name!r} is not a DNS-1123 subdomain (lower-case alphanumerics, '-' and "
            f"'.', starting and ending alphanumeric, at most 253 characters)")


def _quantity(size: int | str) -> str:
    """SIZE as a Kubernetes quantity: integers in the largest binary unit that divides them
    exactly ("10Gi", "512Mi"), else plain bytes; strings checked against the quantity grammar."""
    if isinstance(size, str):
        m = _QUANTITY.fullmatch(size)
        if m is None or not re.search(r"[1-9]", m["num"]):
            raise ConfigurationError(f"size {size!r} is not a positive Kubernetes quantity")
        return size
    _check_int("size", size, minimum=1)
    for suffix, shift in _BINARY_SUFFIXES:
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def persistent_volume_manifest(name: str, device_path: str, node: str, size: int | str, *,
                               storage_class: str = "local-block",
                               access_modes: Sequence[str] = ("ReadWriteOnce",),
                               reclaim_policy: str = "Retain") -> str:
    """YAML text of a v1 PersistentVolume exposing the local block device DEVICE_PATH on NODE.

    The volume is `volumeMode: Block` with a `local` source, SIZE as its capacity (an integer
    number of bytes or a quantity string) and a required node affinity on
    `kubernetes.io/hostname` In [NODE]. Raises ConfigurationError (a ValueError) when NAME or
    STORAGE_CLASS is not a DNS-1123 subdomain, DEVICE_PATH is not absolute, NODE is not a valid
    label value, SIZE is not positive, or an access mode or reclaim policy is unknown.
    """
    _check_subdomain("name", name)
    _check_subdomain("storage_class", storage_class)
    if not isinstance(device_path, str) or not os.path.isabs(device_path):
        raise ConfigurationError(f"device_path {device_path!r} must be an absolute path")
    if not isinstance(node, str) or len(node) > 63 or not _LABEL_VALUE.fullmatch(node):
        raise ConfigurationError(f"node {node!r} is not a valid kubernetes.io/hostname value")
    if isinstance(access_modes, str):
        raise ConfigurationError("access_modes must be a sequence of modes, not a string")
    modes = list(access_modes)
    if not modes or any(m not in _ACCESS_MODES for m in modes):
        raise ConfigurationError(
            f"access_modes {modes!r} must be non-empty and drawn from {sorted(_ACCESS_MODES)}")
    if reclaim_policy not in _RECLAIM_POLICIES:
        raise ConfigurationError(
            f"reclaim_policy {reclaim_policy!r} must be one of {sorted(_RECLAIM_POLICIES)}")

    manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": _quantity(size)},
            "volumeMode": "Block",
            "accessModes": modes,
            "persistentVolumeReclaimPolicy": reclaim_policy,
            "storageClassName": storage_class,
            "local": {"path": device_path},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{
                "key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
        },
    }
    import yaml     # only where manifests are written

    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)
