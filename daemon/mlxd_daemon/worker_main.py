"""The body of a worker process: a loop that runs one request at a time on this process's only MLX thread.

Messages from the front end are ``(op, args)``; replies are ``("event", dict)`` for progress, then exactly one
``("result", value)`` or ``("error", MlxdError.to_dict())``.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import structlog

from mlxd_daemon import blas, logs
from mlxd_daemon.errors import MlxdError
from mlxd_daemon.malloc import pin_mmap_threshold
from mlxd_daemon.progress import Reporter
from mlxd_daemon.spool import unpack
from mlxd_daemon.staging import os_error

log = structlog.get_logger()


def worker_main(conn: Any, cancel_event: Any, role: str, options: dict[str, Any]) -> None:
    """Entry point of the worker process (started with the spawn method)."""
    logs.configure(options.get("log_level", "info"), options.get("log_json"))
    structlog.contextvars.bind_contextvars(worker=role, pid=os.getpid())
    pin_mmap_threshold()  # unloaded models and converted tensors go back to the system
    in_use = blas.preload()  # must precede the first `import mlx.core`
    log.info("blas", blas=in_use)
    if blas.warning(in_use):
        log.warning("slow_blas", message=blas.warning(in_use))
    # heavy imports (mlx, torch) happen here, never in the front end
    from mlxd_daemon import handlers as worker_handlers

    handlers = worker_handlers.handlers(role, options)
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if op == "stop":
            break

        def emit(event: dict[str, Any]) -> None:
            conn.send(("event", event))

        reporter = Reporter(emit=emit, is_cancelled=cancel_event.is_set)
        try:
            conn.send(("result", handlers[op](unpack(args), reporter)))
        except MlxdError as e:
            conn.send(("error", e.to_dict()))
        except OSError as e:  # a full or read-only disk met outside the staged writers (validation.json, ...)
            mapped = os_error(e, Path(args.get("dst") or args.get("model_dir") or e.filename or "."))
            if mapped is None:
                log.error("worker_op_failed", op=op, error=repr(e), traceback=traceback.format_exc())
                mapped = MlxdError(f"internal error in {op}: {type(e).__name__}: {e}", reason="INTERNAL")
            conn.send(("error", mapped.to_dict()))
        except Exception as e:
            log.error("worker_op_failed", op=op, error=repr(e), traceback=traceback.format_exc())
            err = MlxdError(f"internal error in {op}: {type(e).__name__}: {e}", reason="INTERNAL")
            conn.send(("error", err.to_dict()))
    worker_handlers.shutdown()
