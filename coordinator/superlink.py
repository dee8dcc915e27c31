"""`python -m coordinator.superlink`: Flower's SuperLink with its Fleet API on a port of its own.

flwr 1.41 serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr supernode
register`, `flwr ls`) and the Runtime API (its ServerApp processes) on one HTTP port. Whoever
reaches that port can submit runs, which then execute in every tenant's SuperNode; tenants must
reach the Fleet API only. This runs the same SuperLink (same app, same lifespan, same TLS) on two
listening sockets: `--port` serves every API, for operators and the SuperLink's own ServerApp
processes, and `--fleet-port` answers only `/v1/fleet/*` and `/health` (everything else is 404),
so a NetworkPolicy can let tenant pods reach the fleet port alone.

Every other flag is flower-superlink's (`flower-superlink --help`).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

FLEET_PATHS = ("/v1/fleet/", "/health")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class FleetOnlyPort:
    """ASGI wrapper: requests that arrived on `fleet_port` reach only the Fleet API."""

    def __init__(self, app: App, fleet_port: int) -> None:
        self.app = app
        self.fleet_port = fleet_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") or (None, None)
        if (
            scope["type"] == "http"
            and server[1] == self.fleet_port
            and not scope["path"].startswith(FLEET_PATHS)
        ):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m coordinator.superlink",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--fleet-port",
        type=int,
        required=True,
        help="port that serves only the Fleet API (for SuperNodes); must differ from --port",
    )
    args, rest = p.parse_known_args(argv)
    # Imported after our own flags parse: flwr takes seconds to import.
    import importlib

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # The module, not the function of the same name that flwr.superlink.cli exports.
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    sys.argv = ["flower-superlink", *rest]
    config = fs._parse_superlink_lifespan_config()  # flwr 1.41's own flag parsing
    if args.fleet_port == config.port:
        print("superlink: --fleet-port must differ from --port", file=sys.stderr)
        sys.exit(2)
    app = FleetOnlyPort(create_app(config, fs.SuperLinkLifespan), args.fleet_port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            log_config=get_uvicorn_log_config(console_handler.level),
            access_log=True,
            workers=1,  # the lifespan starts the SuperExec once
        )
    )
    server.run(sockets=[_listen(config.host, config.port), _listen(config.host, args.fleet_port)])


if __name__ == "__main__":
    main()
