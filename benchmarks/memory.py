"""Peak RSS growth of one long run, each case in its own child process (peaks never mix).

``python -m benchmarks.memory VARIANT EVENTS TOOL_RESULT_BYTES CHUNK_BYTES MASK MLFLOW_URI LANGFUSE_URL``
prints one JSON line. After a warm-up run (imports, first span, first export) the peak is reset
(``/proc/self/clear_refs``) and the run is driven in-process; VmHWM - VmRSS(before) is the growth
during the stream, and again after the backends' export has drained (bounded wait).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import time

from .common import reset_peak_rss, status_kb
from .inprocess import drive
from .variants import Variants
from .workload import request_body

EXPORT_WAIT = 180.0


def main(argv: list[str]) -> None:
    name, events, result_bytes, chunk, mask, mlflow_uri, langfuse_url = argv
    variants = Variants(mlflow_uri=mlflow_uri, langfuse_host=langfuse_url, mask_messages=mask == "1")
    app = variants.build(name)
    flush = variants.flusher(name)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(drive(app, json.dumps(request_body(500, run_id="warm")).encode()))
    flush()
    body = json.dumps(
        request_body(
            int(events), run_id="memory", tool_result_bytes=int(result_bytes), chunk_bytes=int(chunk)
        )
    ).encode()
    gc.collect()
    before = status_kb("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    loop.run_until_complete(drive(app, body))
    stream_seconds = time.perf_counter() - start
    peak_stream = status_kb("VmHWM")
    after_stream = status_kb("VmRSS")
    exporter = threading.Thread(target=flush, daemon=True)
    exporter.start()
    exporter.join(EXPORT_WAIT)
    print(
        json.dumps(
            {
                "variant": name,
                "events": int(events),
                "rss_before_mb": before / 1024,
                "peak_growth_stream_mb": (peak_stream - before) / 1024,
                "rss_growth_after_stream_mb": (after_stream - before) / 1024,
                "peak_growth_with_export_mb": (status_kb("VmHWM") - before) / 1024,
                "export_done": not exporter.is_alive(),
                "stream_s": stream_seconds,
                "peak_reset": reset,
            }
        ),
        flush=True,
    )
    sys.stdout.flush()
    os._exit(0)  # SDK exit hooks (flush at exit) are not part of the measurement


if __name__ == "__main__":
    main(sys.argv[1:])
