"""The tenant's Flower ClientApp: one train and one evaluate step per round.

Each handler runs its step where the node config says (tenant/worker_link.py): in the tenant's
long-lived worker when it names `worker-socket`, else in this process (tenant/steps.py holds the
steps, their node and run configs). Every reply is built from the allow-list in
tenant/federation.py: numbers, a few closed-set identifiers, and the adapter only when the run
aggregates (`aggregation = "fedavg"`) and the tenant opted into an aggregation group. Sample
generations stay in the tenant's own file; a failed step replies with its phase and exception
class only.

No torch at import: Flower starts a process for every message, and in worker mode this module
is all it loads.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from pema.errors import PemaError
from tenant.federation import (
    ARRAYS,
    INFO,
    METRICS,
    error_reason,
    plain_flower_logs,
    reply_violations,
)
from tenant.worker_link import StepFailed, array_record, run_step

log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]


def _reply(
    msg: Message,
    phase: str,
    metrics: dict[str, int | float],
    info: dict[str, str],
    arrays: ArrayRecord | None = None,
) -> Message:
    """The reply, built only from allow-listed fields (tenant/federation.py); anything else is a
    bug here and fails the round on the tenant rather than reach the server."""
    content = RecordDict({METRICS: MetricRecord(dict(metrics)), INFO: ConfigRecord(dict(info))})
    if arrays is not None:
        content[ARRAYS] = arrays
    bad = reply_violations(content, phase, arrays_allowed=arrays is not None)
    if bad:
        raise PemaError(f"reply fields not on the allow-list: {', '.join(bad)}")
    return Message(content, reply_to=msg)


def _private_errors(phase: str) -> Callable[[Handler], Handler]:
    """A failed step replies with a short code and the exception's class only (for a step that
    failed in the worker, the class it raised there); the whole error (paths, data) goes to the
    tenant's own log."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as e:
                log.exception("%s failed", phase)
                reason = e.reason if isinstance(e, StepFailed) else error_reason(phase, e)
                return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

        return run

    return wrap


app = ClientApp()
plain_flower_logs()


@app.train()
@_private_errors("train")
def train(msg: Message, context: Context) -> Message:
    result = run_step("train", msg, context)
    # Only here does the adapter leave the tenant (the step returns it only when it is shared).
    return _reply(msg, "train", result.metrics, result.info, array_record(result.arrays))


@app.evaluate()
@_private_errors("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    result = run_step("evaluate", msg, context)
    return _reply(msg, "evaluate", result.metrics, result.info)
