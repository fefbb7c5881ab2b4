"""The EP regions' byte kernels vs numpy, guard bytes around every output: the tables on every ISA path that has
one (AVX-512: AVX512-VBMI permutes where the CPU has them, dword gathers otherwise; both checked), over table
counts and lengths around the vector widths; the NCHW <-> NHWC byte transpose at the regions' edges; the regions'
team of pool tasks (ep/team.h)."""
from __future__ import annotations

import numpy as np
import pytest

import qie_ep
from helpers import _ptr, check_guards, guarded_output
from qie_ep import _lib


def lut(isa, t, C, x, vbmi, ld=None):
    """The ISA's table kernel on x (pixels rows of ld bytes, the first C of each looked up)."""
    y, raw = guarded_output(x.shape, np.uint8, 0)
    ld = ld or C
    pixels = x.size // ld
    rc = _lib.testing_lib().qie_test_channel_lut(isa.encode(), _ptr(t), C, _ptr(x), _ptr(y), pixels, ld, int(vbmi))
    if rc != 0:
        return None
    check_guards(raw, f"channel_lut {isa} C={C}")
    return y


@pytest.mark.parametrize("isa", list(qie_ep.ISAS))
@pytest.mark.parametrize("vbmi", [True, False])
@pytest.mark.parametrize("C", [1, 3, 16, 17, 48, 64, 200])
def test_channel_lut_equals_numpy(isa, vbmi, C):
    rng = np.random.default_rng(C)
    t = np.concatenate([rng.integers(0, 256, size=C * 256), np.zeros(3, np.int64)]).astype(np.uint8)  # 3 bytes pad
    ran = False
    for pixels in (0, 1, 5, 15, 16, 17, 63, 64, 65, 130, 1000):
        x = rng.integers(0, 256, size=pixels * C).astype(np.uint8)
        y = lut(isa, t, C, x, vbmi)
        if y is None:
            pytest.skip(f"{isa}: no table kernel here (the region uses its scalar loop)")
        want = t[:C * 256].reshape(C, 256)[np.arange(pixels * C) % C, x]
        np.testing.assert_array_equal(y, want, err_msg=f"{isa} vbmi={vbmi} C={C} pixels={pixels}")
        ran = True
    assert ran


@pytest.mark.parametrize("isa", list(qie_ep.ISAS))
@pytest.mark.parametrize("vbmi", [True, False])
@pytest.mark.parametrize("C,ld", [(3, 5), (16, 48), (17, 20), (48, 512), (96, 100)])
def test_channel_lut_strided_rows(isa, vbmi, C, ld):
    """Per-channel tables on rows wider than the channels looked up (a GEMM task's column block of its output,
    looked up in place): each row's first C bytes from the tables, the rest of the row not written."""
    rng = np.random.default_rng(C * 1000 + ld)
    t = np.concatenate([rng.integers(0, 256, size=C * 256), np.zeros(3, np.int64)]).astype(np.uint8)
    for pixels in (1, 5, 63, 64, 65, 130):
        x = rng.integers(0, 256, size=(pixels, ld)).astype(np.uint8)
        y = lut(isa, t, C, x.ravel(), vbmi, ld)
        if y is None:
            pytest.skip(f"{isa}: no table kernel here (the region uses its scalar loop)")
        y = y.reshape(pixels, ld)
        want = t[:C * 256].reshape(C, 256)[np.arange(C), x[:, :C]]
        np.testing.assert_array_equal(y[:, :C], want, err_msg=f"{isa} vbmi={vbmi} C={C} ld={ld} pixels={pixels}")
        assert (y[:, C:] == 0).all(), "bytes between the rows were written"


@pytest.mark.parametrize("rows", [1, 3, 15, 16, 17, 33, 64])
@pytest.mark.parametrize("cols", [1, 7, 16, 31, 48, 100])
def test_transpose_bytes_equals_numpy(rows, cols):
    """The regions' NCHW <-> NHWC byte transpose (16 x 16 SSE2 blocks, scalar edges) with row strides wider than
    the rows, guard bytes around the output."""
    rng = np.random.default_rng(rows * 1000 + cols)
    ss, ds = cols + 5, rows + 3
    src = rng.integers(0, 256, size=(rows, ss)).astype(np.uint8)
    dst, raw = guarded_output((cols, ds), np.uint8, 7)
    _lib.testing_lib().qie_test_transpose_bytes(_ptr(src), ss, _ptr(dst), ds, rows, cols)
    check_guards(raw, "transpose_bytes")
    np.testing.assert_array_equal(dst[:, :rows], src[:, :cols].T)
    assert (dst[:, rows:] == 7).all()  # the stride's gap untouched


@pytest.mark.parametrize("threads", [1, 2, 4, 8])
def test_team_runs_every_index_once_and_returns_errors(threads):
    """The EP's region team (ep/team.h) on std::threads: every index of every section runs exactly once (sections of
    1, 2, 3 ... 97 indices, more threads than cores), and an index that throws on any member ends its section and
    reaches the caller instead of leaving the leader waiting on it."""
    lib = _lib.testing_lib()
    for sections, n in [(1, 1), (3, 2), (50, 3), (20, 97), (200, 7)]:
        total = sections * n
        assert lib.qie_test_team(threads, sections, n, -1) == total * (total + 1) // 2, (threads, sections, n)
        for throw_at in (0, total // 2, total - 1):
            assert lib.qie_test_team(threads, sections, n, throw_at) == -1, (threads, sections, n, throw_at)
