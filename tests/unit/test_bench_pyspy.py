"""How bench/h2load.py --profile reads py-spy's raw samples: waits left out, each busy sample counted where its
innermost Python frame is."""

from __future__ import annotations

from support import bench_module

pyspy = bench_module("_pyspy.py")

LOOP = "<module> (budgetwarden/__main__.py:3);BaseEventLoop.run_forever (asyncio/base_events.py:607)"
RAW = "\n".join(
    [
        f"{LOOP};EpollSelector.select (selectors.py:468);epoll_wait (libc.so.6) 50",  # waiting: left out
        f"{LOOP};Handle._run (asyncio/events.py:80);check (budgetwarden/transport/_service.py:174) 7",
        f"{LOOP};Handle._run (asyncio/events.py:80);plan_check (budgetwarden/domain/_decision.py:9);"
        "0x7f00 (libpython3.11.so) 3",  # native code called from the domain counts there
        f"{LOOP};Handle._run (asyncio/events.py:80);sendmsg (libc.so.6) 6",
        "start_thread (libc.so.6);pthread_cond_wait (libc.so.6) 20",  # a thread waiting on a lock: left out
        "start_thread (libc.so.6);0x7f01 (grpc/_cython/cygrpc.so) 4",  # busy without Python: gRPC's poller
        "not a sample line",
    ]
)


def test_waits_are_left_out_and_samples_go_to_their_innermost_python_frame() -> None:
    total, shares = pyspy.areas(RAW)
    assert total == 7 + 3 + 6 + 4
    assert shares["budgetwarden transport (servicers, validation, encoding, admission)"] == 7
    assert shares["budgetwarden domain (plans, decisions)"] == 3
    assert shares["asyncio event loop (and the gRPC callbacks it runs)"] == 6
    assert shares["no Python frame (a native thread: gRPC's poller)"] == 4


def test_the_summary_lists_areas_largest_first_and_the_hottest_frames() -> None:
    lines = pyspy.summary(RAW)
    assert lines[0].startswith("20 busy samples")
    areas = [line for line in lines if line.startswith("- ") and "`" not in line]
    assert areas[0] == "- budgetwarden transport (servicers, validation, encoding, admission): 35.0%"
    assert "- `sendmsg (libc.so.6)`: 30.0%" in lines
    assert pyspy.summary("")[0] == "(no busy samples)"
