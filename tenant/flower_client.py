"""The tenant's Flower ClientApp: one train and one evaluate step per round.

Each handler runs its step where the node config says (tenant/worker_link.py): in the tenant's
long-lived worker when it names `worker-socket`, else in this process (tenant/steps.py holds the
steps, their node and run configs). Every reply is built from the allow-list in
tenant/federation.py: numbers, a few closed-set identifiers, and the adapter only when the run
aggregates (`aggregation = "fedavg"`) and the tenant opted into an aggregation group. Under secure
aggregation (the default with fedavg) the adapter leaves only through Flower's SecAgg+ protocol
(`secure_aggregation`, around secaggplus_mod): after the round's training, the server asks a
group's members for their adapters, and each sends it masked so that only the group's sum can be
unmasked. Sample generations stay in the tenant's own file; a failed step replies with its phase
and exception class only.

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
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat

from pema.errors import PemaError
from tenant.federation import (
    ARRAYS,
    INFO,
    METRICS,
    SECAGG,
    RunConfig,
    error_reason,
    plain_flower_logs,
    reply_violations,
    validated,
)
from tenant.worker_link import WORKER_KEYS, StepFailed, array_record, run_step

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


def _error_reply(msg: Message, phase: str, error: Exception) -> Message:
    """A short code and the exception's class only (for a step that failed in the worker or
    inside the SecAgg+ mod, the class it raised there); the whole error (paths, data) goes to the
    tenant's own log."""
    log.exception("%s failed", phase)
    reason = error.reason if isinstance(error, StepFailed) else error_reason(phase, error)
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def _private_errors(phase: str) -> Callable[[Handler], Handler]:
    """A failed step replies through `_error_reply`."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as e:
                return _error_reply(msg, phase, e)

        return run

    return wrap


def secure_aggregation(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower's secaggplus_mod for the SecAgg+ protocol's messages (any other train message goes
    straight on), with each reply checked against the allow-list for its stage before it leaves."""
    configs = msg.content.config_records.get(SECAGG)
    if configs is None:
        return call_next(msg, context)
    stage = str(configs.get(SecAggKey.STAGE, ""))  # read before the mod pops it

    def step(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():
            raise StepFailed(reply.error.reason or "secagg-failed:StepFailed")
        return reply

    try:
        reply = secaggplus_mod(msg, context, step)
        bad = reply_violations(reply.content, stage, arrays_allowed=False)
        if bad:
            raise PemaError(f"SecAgg+ {stage} reply fields not on the allow-list: {bad}")
        return reply
    except Exception as e:
        return _error_reply(msg, "secagg", e)


app = ClientApp()
plain_flower_logs()


@app.train(mods=[secure_aggregation])
def train(msg: Message, context: Context) -> Message:
    # SecAgg+'s masked-vector stage asks for the adapter this round trained (the mod masks it);
    # every other train message that reaches here is the round's training.
    if SECAGG in msg.content.config_records:
        return upload(msg, context)
    return train_round(msg, context)


@_private_errors("upload")
def upload(msg: Message, context: Context) -> Message:
    """The adapter this round trained (its checkpoint), in the legacy FitRes shape secaggplus_mod
    reads, weighted by the training pairs as the train reply's num-examples: the mod masks it and
    empties the arrays before the reply leaves."""
    # Imported here: only this stage needs torch in the ClientApp's own process.
    from pema.adapter import load_adapter
    from tenant.steps import NodeConfig, shares_adapter, upload_arrays

    node = NodeConfig.from_values(
        {k: v for k, v in context.node_config.items() if k not in WORKER_KEYS}
    )
    run = validated(RunConfig, dict(context.run_config), "run config")
    if not (run.secure and shares_adapter(node, run)):
        raise PemaError("this tenant shares its adapter only into its group's SecAgg+ sum")
    sent = msg.content.config_records["fitins.config"]
    adapter, doc = load_adapter(node.adapter_dir)
    arrays = upload_arrays(adapter.state_dict(), float(sent["clipping-range"]))  # type: ignore[arg-type]
    weight = int(doc["training"]["train_pairs"])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@_private_errors("train")
def train_round(msg: Message, context: Context) -> Message:
    result = run_step("train", msg, context)
    # Only here does the adapter leave the tenant in the clear, when its group is averaged so
    # (the step returns it only then); under secure aggregation it leaves masked, via `upload`.
    return _reply(msg, "train", result.metrics, result.info, array_record(result.arrays))


@app.evaluate()
@_private_errors("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    result = run_step("evaluate", msg, context)
    return _reply(msg, "evaluate", result.metrics, result.info)
