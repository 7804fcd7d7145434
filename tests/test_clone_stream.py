"""cdimover's clone stream without a network: the record format, the disk digest against an
independent implementation written here, the producer and the receiver joined in one process
(with a corrupting hook between them), and resumption from a checkpoint."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdimover._native import Context
from cdimover.formats.clonestream import CHECKPOINT, DATA, DIGEST_BLOCK, END, RECORD, ZERO, \
    CloneStreamError, DigestChain, RecordParser, encode_data, encode_mark, encode_zero, \
    stream_head
from cdimover.io.endpoints import open_source
from cdimover.ops.clonestream import CloneReceiver, StreamProducer, disk_digest

MiB = 1 << 20


def oracle_digest(data: bytes) -> str:
    """The disk digest as its definition says, over the whole disk's bytes."""
    h = hashlib.sha256(b"cdimover-disk-digest-v1" + struct.pack("<Q", len(data))).digest()
    for i in range(0, len(data), DIGEST_BLOCK):
        h = hashlib.sha256(h + hashlib.sha256(data[i:i + DIGEST_BLOCK]).digest()).digest()
    return h.hex()


def oracle_file_digest(path: Path) -> str:
    return oracle_digest(path.read_bytes())


def make_disk(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            f.seek(off)
            f.write(rnd.randbytes(n))


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# ---------------------------------------------------------------------------------------------
# The digest

@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 5 * MiB + 777),
       runs=st.lists(st.tuples(st.booleans(), st.integers(1, 3 * MiB)), max_size=8),
       seed=st.integers(0, 1 << 30))
def test_digest_chain_matches_the_definition(size: int, runs: list[tuple[bool, int]],
                                             seed: int) -> None:
    """Fed as any mix of data pieces and zero runs, the chain equals the definition over the
    disk's bytes."""
    rnd = random.Random(seed)
    disk = bytearray(size)
    chain = DigestChain(size)
    pos = 0
    for is_data, n in runs:
        n = min(n, size - pos)
        if is_data:
            piece = rnd.randbytes(n)
            disk[pos:pos + n] = piece
            chain.data(piece)
        else:
            chain.zeros(n)
        pos += n
    chain.zeros(size - pos)
    assert chain.digest().hex() == oracle_digest(bytes(disk))


def test_digest_resumes_from_its_state() -> None:
    data = random.Random(3).randbytes(3 * MiB + 5)
    full = DigestChain(len(data))
    full.data(data[:2 * MiB])
    state = full.state
    full.data(data[2 * MiB:])
    half = DigestChain.resume(len(data), 2 * MiB, state)
    half.data(data[2 * MiB:])
    assert half.digest() == full.digest()
    with pytest.raises(CloneStreamError):
        DigestChain.resume(len(data), MiB + 1, state)     # not a block boundary


def test_disk_digest_reads_only_data_and_matches(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 9 * MiB + 4096, [(5000, 70000), (4 * MiB, MiB + 3), (9 * MiB, 4096)])
    assert disk_digest(disk) == oracle_file_digest(disk)
    empty = tmp_path / "empty.img"
    with open(empty, "wb") as f:
        f.truncate(64 << 30)       # 64 GiB of holes: one short hash per MiB, no reads
    assert disk_digest(empty) == _zeros_digest(64 << 30)


def _zeros_digest(size: int) -> str:
    c = DigestChain(size)
    c.zeros(size)
    return c.digest().hex()


# ---------------------------------------------------------------------------------------------
# The record format

def _stream(size: int, records: list[bytes]) -> bytes:
    return stream_head() + b"".join(records)


def test_parser_in_any_pieces_and_its_checks() -> None:
    data = random.Random(5).randbytes(3000)
    chain = DigestChain(8192)
    chain.data(data)
    chain.zeros(8192 - 3000)
    head, payload = encode_data(0, data)
    head_z, payload_z = encode_data(0, bytes(3000) + data[:10], compress=True)
    body = _stream(8192, [head, bytes(payload), encode_zero(3000, 8192 - 3000),
                          encode_mark(END, 8192, chain.digest())])
    for step in (1, 7, 32, 4096, len(body)):
        p = RecordParser(8192)
        recs = [r for i in range(0, len(body), step) for r in p.feed(body[i:i + step])]
        p.finish()
        assert [r.kind for r in recs] == [DATA, ZERO, END]
        assert bytes(recs[0].payload) == data
    # zstd payloads decode; the flag is checked
    p = RecordParser(3010)
    assert len(payload_z) < 3010
    (rec,) = list(p.feed(stream_head() + head_z + payload_z))
    assert bytes(rec.payload) == bytes(3000) + data[:10]

    def refused(stream: bytes, match: str, size: int = 8192) -> None:
        p = RecordParser(size)
        with pytest.raises(CloneStreamError, match=match):
            list(p.feed(stream))
            p.finish()

    flipped = bytearray(payload)
    flipped[100] ^= 0x10
    refused(_stream(8192, [head, bytes(flipped)]), "CRC-32C mismatch")
    refused(b"CDMCLONX" + stream_head()[8:], "bad magic")
    refused(_stream(8192, [encode_zero(4096, 10)]), "expected 0")            # a gap
    refused(_stream(8192, [encode_zero(0, 9000)]), "passes the end")
    refused(_stream(8192, [encode_zero(0, 8192), encode_zero(8192, 1)]), "passes the end")
    refused(_stream(8192, [head]), "stopped at offset 0")                  # truncated
    refused(_stream(8192, [RECORD.pack(9, 0, 0, 0, 0, 1, 0)]), "unknown record type")
    refused(_stream(8192, [RECORD.pack(DATA, 0, 0, 0, 0, 1 << 30, 1 << 30)]), "bad data")
    refused(_stream(8192, [encode_zero(0, 8192), encode_mark(END, 8192, bytes(32)), b"x"]),
            "bytes after the end record")
    refused(_stream(8192, [encode_zero(0, 4096), encode_mark(END, 4096, bytes(32))]),
            "the stream ends at 4096")


# ---------------------------------------------------------------------------------------------
# Producer -> receiver in one process

LAYOUTS = {
    "mixed": (40 * MiB + 12345, [(0, 4096), (3 * MiB + 17, 2 * MiB), (10 * MiB, 5 * MiB),
                                 (40 * MiB, 12345)]),
    "dense": (9 * MiB, [(0, 9 * MiB)]),
    "empty": (32 * MiB, []),
}


def feed_all(rc: CloneReceiver, p: StreamProducer) -> None:
    """Every piece of P's stream into RC, as one request would carry them."""
    try:
        for piece in p.pieces():
            rc.push(piece)
    finally:
        p.close()


def _clone(src: Path, dst: Path, *, compress: bool = False, checkpoint: int = 4 * MiB,
           hook: object = None) -> tuple[CloneReceiver, StreamProducer]:
    size = os.path.getsize(src)
    with Context() as ctx, open_source(src, ctx=ctx) as s:
        p = StreamProducer(ctx, s, compress=compress, checkpoint_bytes=checkpoint)
        rc = CloneReceiver(str(dst), size, session="t", capacity=1 << 40)
        rc.begin(0)
        try:
            for piece in p.pieces():
                rc.push(hook(piece) if callable(hook) else piece)  # type: ignore[operator]
        finally:
            p.close()
        return rc, p


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stream_is_exact_sparse_and_data_only(layout: str, compress: bool,
                                              tmp_path: Path) -> None:
    size, extents = LAYOUTS[layout]
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_disk(src, size, extents)
    with open(src, "r+b") as f:          # zeros written as data: not sent, a hole on the target
        f.seek(20 * MiB if size > 21 * MiB else 0)
        f.write(bytes(MiB))
    rc, p = _clone(src, dst, compress=compress)
    rc.finish_body()
    res = rc.complete()
    assert dst.read_bytes() == src.read_bytes()
    assert res.digest == oracle_file_digest(src) == p.digest.hex()
    data = sum(n for _, n in extents)
    assert p.counters.data <= data + 2 * 65536 * len(extents)
    if not compress:
        assert p.counters.wire <= p.counters.data * 1.02 + 64 * 1024
    assert allocated(dst) <= data + 64 * 1024 * (len(extents) + 1)


def test_corruption_between_the_ends_is_never_complete(tmp_path: Path) -> None:
    """A flipped bit in a data payload: the CRC refuses the record before it is written.  A
    flipped bit with the CRC made to match (a bug or memory error upstream of the CRC): the
    digest refuses the checkpoint, which stays where the last good one was."""
    size, extents = LAYOUTS["mixed"]
    src = tmp_path / "src.img"
    make_disk(src, size, extents)
    state = {"n": 0}

    def flip(piece: bytes | memoryview) -> bytes | memoryview:
        state["n"] += 1
        if len(piece) > 100_000 and state["n"] > 4 and "done" not in state:
            state["done"] = 1
            b = bytearray(piece)
            b[12345] ^= 1
            return bytes(b)
        return piece

    with pytest.raises(CloneStreamError, match="CRC-32C mismatch"):
        _clone(src, tmp_path / "a.img", hook=flip)

    import cdimover.formats.clonestream as fmt

    real = fmt._native.crc32c
    # Build the corrupted stream by hand: the producer's pieces, one DATA record's payload
    # changed and its header's CRC fixed up, fed to a receiver.
    size = os.path.getsize(src)
    with Context() as ctx, open_source(src, ctx=ctx) as s:
        p = StreamProducer(ctx, s, checkpoint_bytes=2 * MiB)
        try:
            stream = [bytes(piece) for piece in p.pieces()]   # (buffers are reused)
        finally:
            p.close()
    first_mark = next(i for i, piece in enumerate(stream) if piece[:1] == bytes([CHECKPOINT]))
    for i, piece in enumerate(stream):
        if len(piece) == RECORD.size and piece[:1] == bytes([DATA]) and i > first_mark:
            payload = bytearray(stream[i + 1])
            payload[7] ^= 0x01
            hdr = bytearray(piece)
            struct.pack_into("<I", hdr, 4, real(payload))
            stream[i], stream[i + 1] = bytes(hdr), bytes(payload)
            break
    rc = CloneReceiver(str(tmp_path / "b.img"), size, session="t", capacity=1 << 40)
    rc.begin(0)
    with pytest.raises(CloneStreamError, match="disk digest mismatch"):
        for piece in stream:
            rc.push(piece)
    good = rc.durable
    assert good > 0 and rc.digest is None
    # the receiver can be resumed from its last good checkpoint, and then completes exactly
    with Context() as ctx, open_source(src, ctx=ctx) as s:
        p = StreamProducer(ctx, s, start=good, state=bytes.fromhex(
            str(rc.resume_point()["state"])), checkpoint_bytes=2 * MiB)
        rc.begin(good)
        feed_all(rc, p)
    rc.finish_body()
    res = rc.complete()
    assert (tmp_path / "b.img").read_bytes() == src.read_bytes()
    assert res.digest == oracle_file_digest(src)
    assert res.resumes == 1


def test_resume_after_a_cut_sends_at_most_one_checkpoint_again(tmp_path: Path) -> None:
    size, extents = 48 * MiB, [(i * 3 * MiB, 2 * MiB) for i in range(16)]
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_disk(src, size, extents)
    cp = 4 * MiB
    with Context() as ctx, open_source(src, ctx=ctx) as s:
        p = StreamProducer(ctx, s, checkpoint_bytes=cp)
        rc = CloneReceiver(str(dst), size, session="t", capacity=1 << 40)
        rc.begin(0)
        sent = 0
        try:
            for piece in p.pieces():
                rc.push(piece)
                sent += len(piece)
                if sent > 20 * MiB:
                    break            # the link is cut
        finally:
            p.close()
        point = rc.resume_point()
        assert 0 < int(point["offset"]) < size          # type: ignore[call-overload]
        with pytest.raises(CloneStreamError, match="durable up to"):
            rc.begin(0)
        p2 = StreamProducer(ctx, s, start=int(point["offset"]),  # type: ignore[call-overload]
                            state=bytes.fromhex(str(point["state"])), checkpoint_bytes=cp)
        rc.begin(int(point["offset"]))                  # type: ignore[call-overload]
        feed_all(rc, p2)
    rc.finish_body()
    res = rc.complete()
    assert dst.read_bytes() == src.read_bytes()
    assert res.digest == oracle_file_digest(src)
    data = sum(n for _, n in extents)
    assert p.counters.data + p2.counters.data <= data + cp + 4 * MiB   # + one window in flight


def test_digest_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cdimover.cli import main

    vol = tmp_path / "vol"
    vol.mkdir()
    make_disk(vol / "disk.img", 5 * MiB + 3, [(MiB - 10, 20), (4 * MiB, MiB + 3)])
    assert main(["digest", str(vol)]) == 0
    out = capsys.readouterr().out
    assert out == f"{oracle_file_digest(vol / 'disk.img')}  {vol / 'disk.img'}\n"
    assert main(["digest", str(tmp_path / "missing.img")]) != 0
    assert "missing.img" in capsys.readouterr().err


def test_chunked_sender_keeps_the_bytes_of_reused_buffers(tmp_path: Path) -> None:
    """The sender gathers small records before it sends them while the producer refills its
    windows: what goes out must still be what was read (a regression: small records were
    sent from a buffer already holding the next window)."""
    from cdimover.pod.clonesource import _send_chunked

    size = 96 * MiB
    rnd = random.Random(9)
    extents = [(i * 512 * 1024 + rnd.randrange(0, 4) * 65536, rnd.choice((65536, 131072)))
               for i in range(190)]
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_disk(src, size, extents)

    class Wire:
        def __init__(self) -> None:
            self.out = bytearray()

        def send(self, data: bytes | memoryview) -> None:
            self.out += data

    def slowly(pieces: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        for piece in pieces:          # a slow link: the producer refills while we wait
            time.sleep(0.001)
            yield piece

    wire = Wire()
    with Context() as ctx, open_source(src, ctx=ctx) as s:
        p = StreamProducer(ctx, s, checkpoint_bytes=2 * MiB)
        try:
            _send_chunked(wire, slowly(p.pieces()))  # type: ignore[arg-type]
        finally:
            p.close()
    body, pos = bytearray(), 0
    while True:                                   # undo the chunked encoding
        eol = wire.out.index(b"\r\n", pos)
        n = int(wire.out[pos:eol], 16)
        if n == 0:
            break
        body += wire.out[eol + 2:eol + 2 + n]
        pos = eol + 2 + n + 2
    rc = CloneReceiver(str(dst), size, session="t", capacity=1 << 40)
    rc.begin(0)
    rc.push(bytes(body))
    rc.finish_body()
    assert rc.complete().digest == oracle_file_digest(src)
    assert dst.read_bytes() == src.read_bytes()
