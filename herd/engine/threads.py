"""Threads and GNU OpenMP: why the server loads its model on a thread that ends (`in_fresh_thread`).

torch's CPU kernels and herd's native ones share one OpenMP runtime (GNU libgomp, loaded by torch). libgomp keeps an
idle worker team for every thread that ever opened a parallel region and counts those workers as busy for as long
as their thread lives. When the busy count exceeds the cores, its workers stop spin-waiting between regions and go
to sleep instead, and every region then pays a wake-up. So a second thread running model work next to the idle
team of the first one is slow: that is the engine thread beside the main thread that loaded the model. Only the
end of a thread frees its team, hence a fresh thread for the loading, and all later model work on the engine's
thread (Engine.batch_call).
"""

from __future__ import annotations

import threading
from typing import Callable


def in_fresh_thread(fn: Callable[[], object]) -> object:
    """fn() run on a new thread that ends before this returns (its exception re-raised here). Load a model this
    way when an engine thread will drive it: GNU OpenMP (torch's, and the native kernels') keeps an idle worker
    team for every thread that ever opened a parallel region, counts them all as busy, and once they outnumber the
    cores its workers stop spin-waiting between regions and sleep instead. A decode step opens hundreds of regions,
    so an engine thread next to a loading thread's idle team decoded 3x slower (26 vs 9 ms a token, default model,
    2 threads); a team is freed when its thread ends."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="herd-load", daemon=True)  # daemon: Ctrl-C during a load exits
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
