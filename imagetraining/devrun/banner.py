"""The banner `make run` prints once both servers answer SERVING.

So that a first-time user sees exactly what to type next: both addresses, the database, the library
roots, and grpcurl lines to paste (the session calls in order, with a body that fits the library).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from imagetraining.settings import Settings

CONTROL_SERVICE = "imagetraining.v1.TrainingSessionService"
WORKER_SERVICE = "imagetraining.v1.DiscoveryWorkerService"


def _grpcurl() -> str:
    exe = Path(sys.executable).parent / "grpcurl"
    with contextlib.suppress(ValueError):
        return str(exe.relative_to(Path.cwd()))
    return str(exe)


def _example_selections(root: Path, demo: bool, settings: Settings) -> list[str]:
    if demo:
        return ["animals", "landscapes"]
    from imagetraining.walk import list_subdirectories

    with contextlib.suppress(OSError):
        subdirs, _more = list_subdirectories(str(root), settings.library_roots, limit=2)
        if subdirs:
            return [os.path.basename(s) for s in subdirs]
    return ["."]


def banner(settings: Settings, demo: Path | None, control: str, worker: str, database: str) -> str:
    g = _grpcurl()
    flags = ["-plaintext"]
    if settings.tls_cert_file is not None:
        flags = ["-cacert", str(settings.tls_ca_file or settings.tls_cert_file)]
    if settings.auth_token:
        flags += ["-H", '"authorization: Bearer $IMAGETRAINING_AUTH_TOKEN"']
    flag_text = " ".join(f if f.startswith('"') else shlex.quote(f) for f in flags)
    root = settings.library_roots[0]
    selections = _example_selections(root, demo is not None, settings)
    svc = CONTROL_SERVICE
    name = "sessions/1"

    def call(method: str, body: dict[str, object] | None = None, service: str = svc) -> str:
        data = f"-d {shlex.quote(json.dumps(body))} " if body is not None else ""
        return f"  {g} {flag_text} {data}{control} {service}/{method}"

    roots = os.pathsep.join(str(r) for r in settings.library_roots)
    lines = [
        "",
        "imagetraining is serving (Ctrl-C to stop)",
        f"  control service   {control}   {CONTROL_SERVICE}",
        f"  discovery worker  {worker}   {WORKER_SERVICE}",
        f"  database          {database}",
        f"  library roots     {roots}" + ("   (the generated demo library)" if demo else ""),
        "",
        "Try it with grpcurl (server reflection: no .proto file needed):",
        f"  {g} {flag_text} {control} list",
        call("CreateSession", {"display_name": "first try", "root_path": str(root)}),
        "  # use the name CreateSession returned; a fresh database starts at sessions/1",
        call("UpdateSubdirectories", {"name": name, "selections": [{"path": s, "selected": True} for s in selections]}),
        call("ValidateSession", {"name": name}),
        call("StartSession", {"name": name}),
        call("GetSession", {"name": name}),
        call("WatchSession", {"name": name}),
        "",
    ]
    return "\n".join(lines)
