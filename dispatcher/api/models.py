"""Request and response models of the HTTP API (upstream's OpenAPI component names).

Request models validate bodies; response models only document them (handlers answer
with the dicts the operations return, so extra keys from agents pass through). Results
carry whatever the agent sent, hence ``extra="allow"`` on the per-host models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCRIPT_PATTERN = r"^[\w-]+$"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorResponse(BaseModel):
    """Every error body: ``error`` is a short class, ``detail`` explains."""

    ok: Literal[False] = False
    error: str
    detail: str | None = None
    code: Literal[1, 2, 3, 4] | None = Field(
        None, description="1 denied, 2 bad credentials, 3 insufficient privilege, 4 locked"
    )
    conflicts: list[str] | None = Field(None, description="host:script pairs already running")


class Endpoint(BaseModel):
    method: str
    path: str


class IndexResponse(BaseModel):
    name: str = "ctrl-exec-api"
    version: str
    spec: str = "/openapi.json"
    live_spec: str = "/openapi-live.json"
    endpoints: list[Endpoint]


class HealthResponse(BaseModel):
    ok: bool
    version: str


class Targets(BaseModel):
    """Which agents: ``hosts`` (names, ``name:port``, globs), ``tags``, ``all``."""

    model_config = ConfigDict(populate_by_name=True)

    hosts: list[str] = Field(
        default_factory=list,
        description="registered agent names (name or name:port) or globs (web*, db[12]); "
        "required unless tags or all is given",
    )
    tags: dict[str, str] | None = Field(
        None, description="key=value pairs every selected agent's registry tags must have "
        "(filters hosts when given, else every registered agent)",
    )  # fmt: skip
    all_: bool = Field(False, alias="all", description="every registered agent")
    strict: bool | None = Field(
        None, description="any unknown host refuses the whole request (404); default: true "
        "for a plain list of names (upstream), false with globs, tags or all (unknown hosts "
        "come back as per-host results with status unknown, the rest run)",
    )  # fmt: skip


class Counts(BaseModel):
    """How many hosts came to each outcome."""

    ok: int
    failed: int
    unreachable: int
    denied: int
    locked: int
    unknown: int
    skipped: int | None = Field(
        None, description="rolling runs only: hosts the failure budget kept from starting"
    )


class Rolled(BaseModel):
    """How a rolling run went (present when batch, max_fail or fail_fast was given)."""

    batch: str | None = Field(None, description="wave size asked for (N or N%)")
    max_fail: str | None = Field(None, description="failure budget asked for (N or N%)")
    waves: int
    waves_started: int
    stopped: bool = Field(description="the budget was spent: some hosts never started")
    skipped: int


_SIZE_DOC = "a number of hosts N (>= 1) or a share of the targets N% (1..100)"


class Rolling(BaseModel):
    """Waves and a failure budget (sync runs; ping takes batch only)."""

    batch: int | str | None = Field(
        None, description=f"run in waves of this many hosts, the next wave once the current "
        f"one has finished: {_SIZE_DOC}",
    )  # fmt: skip


class PingRequest(Targets, Rolling):
    username: str = ""
    token: str = ""


class PingResult(_Open):
    host: str
    status: str = Field(description="ok, or error with an error string")
    version: str | None = None
    reported_hostname: str | None = None
    error: str | None = None
    rtt: str | None = None
    reqid: str | None = None


class PingResponse(BaseModel):
    ok: bool
    results: list[PingResult]
    counts: Counts
    rolling: Rolled | None = None


class RunRequest(Targets, Rolling):
    script: str = Field(pattern=SCRIPT_PATTERN, description="allowlisted script name")
    args: list[str] = Field(default_factory=list)
    username: str = ""
    token: str = ""
    async_: bool = Field(False, alias="async", description="submit and return at once (202)")
    max_fail: int | str | None = Field(
        None, description="stop starting hosts once this many have failed or were "
        f"unreachable (those running finish; the rest come back skipped): {_SIZE_DOC}",
    )  # fmt: skip
    fail_fast: bool = Field(False, description="max_fail 1")


class RunResult(_Open):
    host: str
    script: str | None = None
    exit: int = Field(description="script exit status; -1 when it did not run")
    status: str | None = Field(
        None, description="unknown: no such agent; skipped: a rolling run's failure budget "
        "was spent before this host started (nothing ran on either)",
    )  # fmt: skip
    wave: int | None = Field(None, description="rolling runs with batch: the host's wave")
    stdout: str | None = None
    stderr: str | None = None
    error: str | None = None
    reqid: str | None = None
    rtt: str | None = None
    reported_hostname: str | None = None


class RunResponse(BaseModel):
    ok: bool
    reqid: str
    results: list[RunResult]
    counts: Counts
    rolling: Rolled | None = None


class AsyncSubmitResult(_Open):
    host: str
    status: Literal["accepted", "busy", "error", "unknown"]
    error: str | None = None
    reqid: str | None = None
    rtt: str | None = None


class AsyncSubmitResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    ok: bool
    reqid: str
    async_: Literal[True] = Field(True, alias="async")
    results: list[AsyncSubmitResult]
    counts: Counts


class HostStatus(_Open):
    status: Literal["accepted", "running", "done", "expired", "busy", "error"]
    exit: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    error: str | None = None
    fetch_error: str | None = None


class StatusResponse(_Open):
    ok: bool
    reqid: str
    script: str | None = None
    mode: Literal["sync", "async"]
    hosts: dict[str, HostStatus] | list[str] = Field(
        description="async: per-host status map; sync: the host names"
    )
    results: list[RunResult] | None = Field(None, description="sync runs only")
    pending: list[str] | None = None
    complete: bool
    created: int | None = None
    completed: int | None = None


class DiscoveryRequest(BaseModel):
    hosts: list[str] | None = Field(None, description="omit for every registered agent")
    username: str = ""
    token: str = ""


class ScriptEntry(_Open):
    name: str
    profile: str | None = None
    path: str | None = None
    executable: bool | None = None


class HostCapabilities(_Open):
    host: str | None = None
    status: str | None = None
    version: str | None = None
    reported_hostname: str | None = None
    tags: dict[str, Any] | None = None
    scripts: list[ScriptEntry] | None = None
    error: str | None = None
    rtt: str | None = None


class DiscoveryResponse(BaseModel):
    ok: bool
    hosts: dict[str, HostCapabilities]


# -- cluster routes (dispatcher/api/routes/pairing.py, cluster_control.py) ------------------


class Credentials(BaseModel):
    username: str = ""
    token: str = ""


class ApproveRequest(Credentials):
    lookup_by: str | None = Field(
        default=None, description="ip or hostname (default: the agent's hint)"
    )
    ip: str | None = Field(default=None, description="address to register (default: queued)")
    agent_port: int | None = Field(
        default=None, description="agent port (default: the reported one, or 7443)"
    )


class DenyRequest(Credentials):
    reason: str = "rejected by operator"


class PairingListResponse(BaseModel):
    ok: bool = True
    leader: str
    epoch: int
    requests: list[dict[str, Any]]


class DecisionResponse(BaseModel):
    ok: bool = True
    reqid: str
    status: str = Field(description="approved or denied")
    leader: str
    epoch: int = Field(description="the epoch the decision was committed under")
    agent: str | None = None
    ip: str | None = None
    port: int | None = None
    lookup_by: str | None = None
    expiry: str | None = None
    dispatcher_serial: str | None = None
    warnings: list[str] = []


class SwitchoverResponse(BaseModel):
    ok: bool = True
    leader: str = Field(description="the leader asked to resign")
    epoch: int
    action: str = Field(description="resigned (this instance led) or requested (through etcd)")


class RunSummary(_Open):
    """One run of the job history (dispatcher/history): no output."""

    reqid: str
    script: str
    user: str
    user_source: str | None = None
    targets: list[str]
    targets_total: int | None = Field(None, description="when more targets than listed")
    counts: dict[str, int]
    started: str
    finished: str
    instance: str


class RunsPage(BaseModel):
    ok: bool
    runs: list[RunSummary]
    next: str | None = Field(None, description="pass as ?cursor= for the next page")
    warnings: list[str] = []


class RunRecord(RunSummary):
    """A run with each host's outcome, exit, stdout and stderr."""

    ok: bool
    hosts: dict[str, dict[str, Any]]
