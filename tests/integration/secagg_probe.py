"""The project's ServerApp and ClientApp, instrumented for the secure-aggregation test; the test
runs them as their own Flower app (`probe_app` writes it), in real SuperLink/SuperNode processes.

- `server_app` runs coordinator.flower_server's main on a `RecordingGrid`: every message that
  server code sends or receives, values included, is appended to `<audit-log>.probe.pkl`. Grid
  messages are the only way anything from a tenant reaches server code, so the record shows what
  the server could ever see: the test finds no member's adapter in it, and finds the average the
  server sends back equal to the members' mean.
- `client_app` is the tenant's ClientApp (same functions, same SecAgg+ mod) plus two test-only
  mods: after each round's training it copies the adapter just trained to
  `<adapter-dir>.round<N>.safetensors` (the ground truth the server never sees), and a tenant
  whose `<adapter-dir>.tamper` file exists adds a stray field to its masked-vector reply after
  the tenant's own allow-list check (a misbehaving tenant the server must reject).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SType
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.serverapp import Grid, ServerApp

from coordinator import flower_server
from coordinator.flower_server import DelegatingGrid
from pema.adapter import WEIGHTS_FILE
from tenant import flower_client as tenant
from tenant.federation import CONFIG, SECAGG

TAMPERED_FIELD = "note"


def values(content: RecordDict) -> dict[str, dict[str, Any]]:
    """Every record's values; arrays as NumPy arrays where they hold one (legacy placeholders,
    such as an empty FitIns' `_empty`, stay `Array`s)."""

    def value(v: Any) -> Any:
        return v.numpy() if isinstance(v, Array) and v.stype == SType.NUMPY else v

    return {name: {k: value(v) for k, v in record.items()} for name, record in content.items()}


def stage_of(msg: Message) -> str:
    configs = msg.content.config_records.get(SECAGG) if msg.has_content() else None
    return str(configs.get(Key.STAGE, "")) if configs is not None else ""


class RecordingGrid(DelegatingGrid):
    """The grid the ServerApp is given, recording every message through it in both directions."""

    def __init__(self, grid: Grid, out: Path) -> None:
        super().__init__(grid)
        self.out = out
        self.asked: dict[str, tuple[int, str]] = {}  # message id -> (node, SecAgg+ stage)

    def record(self, direction: str, msg: Message, node: int, stage: str) -> None:
        entry = {"dir": direction, "node": node, "type": msg.metadata.message_type, "stage": stage}
        entry["records"] = values(msg.content) if msg.has_content() else {}
        with self.out.open("ab") as f:
            pickle.dump(entry, f)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        sent = list(messages)
        # Read before sending: the stage is part of what goes out.
        stages = [stage_of(m) for m in sent]
        for m, stage in zip(sent, stages, strict=True):
            self.record("out", m, m.metadata.dst_node_id, stage)
        ids = list(self.grid.push_messages(sent))
        # Pushing gave every sent message its id.
        for m, stage in zip(sent, stages, strict=True):
            self.asked[m.metadata.message_id] = (m.metadata.dst_node_id, stage)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for r in replies:
            node, stage = self.asked.get(
                r.metadata.reply_to_message_id, (r.metadata.src_node_id, "")
            )
            self.record("in", r, node, stage)
        return replies


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["audit-log"])).with_suffix(".probe.pkl")
    flower_server.main(RecordingGrid(grid, out), context)


def _adapter_dir(context: Context) -> Path:
    return Path(str(context.node_config["adapter-dir"]))


def tamper(msg: Message, context: Context, call_next: tenant.Handler) -> Message:
    stage = stage_of(msg)  # secaggplus_mod pops it from the message
    reply = call_next(msg, context)
    tampering = _adapter_dir(context).with_suffix(".tamper").is_file()
    if stage == Stage.COLLECT_MASKED_VECTORS and tampering and not reply.has_error():
        reply.content.config_records[SECAGG][TAMPERED_FIELD] = "hello from the tenant"
    return reply


def keep_trained_adapter(msg: Message, context: Context, call_next: tenant.Handler) -> Message:
    training = SECAGG not in msg.content.config_records  # not a SecAgg+ stage
    reply = call_next(msg, context)
    if training and not reply.has_error():
        adapter_dir = _adapter_dir(context)
        rnd = int(msg.content[CONFIG]["server-round"])  # type: ignore[arg-type]
        copy = adapter_dir.with_name(f"{adapter_dir.name}.round{rnd}.safetensors")
        shutil.copy(adapter_dir / WEIGHTS_FILE, copy)
    return reply


client_app = ClientApp(mods=[tamper])
client_app.train(mods=[keep_trained_adapter, tenant.secure_aggregation])(tenant.train)
client_app.evaluate()(tenant.evaluate)


def probe_app(root: Path, out: Path) -> Path:
    """This project's Flower app with the probe's components in their place, in `out`."""
    text = (root / "pyproject.toml").read_text()
    for line, probe in (
        ('serverapp = "coordinator.flower_server:app"', 'serverapp = "secagg_probe:server_app"'),
        ('clientapp = "tenant.flower_client:app"', 'clientapp = "secagg_probe:client_app"'),
    ):
        assert line in text, line
        text = text.replace(line, probe)
    # The FAB holds the probe alone: the project's packages come from the environment.
    start = text.index("fab-include = [")
    end = text.index("\n", start)
    text = text[:start] + 'fab-include = ["secagg_probe.py"]' + text[end:]
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text(text)
    shutil.copy(Path(__file__), out / "secagg_probe.py")
    return out


def read_record(path: Path) -> list[dict[str, Any]]:
    entries = []
    with path.open("rb") as f:
        while True:
            try:
                entries.append(pickle.load(f))
            except EOFError:
                return entries
