"""What the HTTP routes need from the serving system, over a Controller in the same process
(`LocalFrontend`) or over a link to the controller's process (`server/remote.py`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Protocol

from distserve.cluster.controller import Controller
from distserve.core import SamplingParams
from distserve.model.tokenizer import Tokenizer
from distserve.runtime.outputs import RequestOutput
from distserve.server.metrics import Metrics

Prompt = str | list[int]


class Handle(Protocol):
    """A submitted request, as the routes hold it."""

    request_id: str


class Frontend(Protocol):
    """Submit, stream and abort requests; the cluster's health, metrics and role flips.

    `submit` raises ValueError (a request that can never run), Overloaded (no room: retry
    later) or RequestFailed (nothing can serve it), as `Controller.submit_all`; `stream`
    raises RequestFailed when a request cannot finish."""

    tokenizer: Tokenizer
    max_model_len: int

    async def submit(
        self, prompts: list[tuple[Prompt, SamplingParams]], request_ids: list[str], n: int
    ) -> list[Any]: ...

    def stream(self, handle: Any) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    async def health(self) -> tuple[dict[str, Any], int]: ...

    async def metrics_text(self) -> bytes: ...

    async def flip(self, instance: str, role: str) -> dict[str, Any]: ...


class LocalFrontend:
    """The routes over a Controller running in this process."""

    def __init__(self, controller: Controller, metrics: Metrics) -> None:
        self.controller, self.metrics = controller, metrics
        self.tokenizer = controller.tokenizer
        self.max_model_len = controller.max_model_len

    async def submit(
        self,
        prompts: list[tuple[Prompt, SamplingParams]],
        request_ids: list[str],
        n: int,
        queues: list[Any] | None = None,
    ) -> list[Any]:
        ids: list[str | None] = list(request_ids)
        return self.controller.submit_all(prompts, ids, n, queues)

    def stream(self, handle: Any) -> AsyncIterator[RequestOutput]:
        return self.controller.stream(handle)

    def abort(self, request_id: str) -> None:
        self.controller.abort(request_id)

    async def health(self) -> tuple[dict[str, Any], int]:
        """The instances' state; 503 while any is down."""
        controller = self.controller
        alive = {i.name: i.alive for i in controller.instances}
        ok = bool(alive) and all(alive.values())
        detail: dict[str, dict[str, Any]] = {
            i.name: {"alive": i.alive, "pid": i.pid, "role": i.role.value, "flipping": i.draining}
            for i in controller.instances
        }
        recovery = controller.recovery
        for name, attempt in recovery.restart_attempts.items():  # why a role is still down
            detail[name]["restart_attempt"] = attempt
        for name, error in recovery.restart_errors.items():
            detail[name]["restart_error"] = error
        body: dict[str, Any] = {"status": "ok" if ok else "degraded", "instances": detail}
        covering = controller.degraded.reason if controller.degraded is not None else None
        if covering:
            body["degraded_mode"] = covering
        return body, 200 if ok else 503

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition of the controller's metrics."""
        return self.metrics.render()

    async def flip(self, instance: str, role: str) -> dict[str, Any]:
        """Raises ValueError for an unknown instance or role."""
        return dataclasses.asdict(await self.controller.flip(instance, role))
