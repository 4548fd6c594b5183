"""ocp-agentctl's program commands: status, start, stop, restart, verify, logs, signal,
reload, events, version (SPEC sections 6, 7 and 12).

Each handler is ``(args, api, out) -> exit status`` over a :class:`Transport`; an
:class:`ApiError` or :class:`Unavailable` it raises is reported by ``cli.main``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ocp_agentd import __version__
from ocp_agentd.cli.http11 import ProtocolError
from ocp_agentd.cli.output import Output, clock, duration, last_exit
from ocp_agentd.cli.transport import ApiError, Transport, Unavailable

TYPE_CHECKING = False  # typing itself is a tenth of the command's start-up
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
PROCESS_NOT_FOUND = 2001
# An event stream waits at most this long for a line: the daemon sends a keep-alive comment
# every 15 s, so a stream silent this long has lost its daemon.
STREAM_READ_SECONDS = 45.0
PROCESS_HEADERS = ("NAME", "ROLE", "STATE", "PID", "UPTIME", "RESTARTS", "PORTS", "LAST EXIT")


def path_of(name: str, action: str = "") -> str:
    # Imported here: status and the task commands need no quoting, and urllib.parse costs
    # milliseconds of start-up.
    from urllib.parse import quote

    tail = f"/{action}" if action else ""
    return f"/api/v1/processes/{quote(name, safe='')}{tail}"


def process_row(record: dict[str, Any]) -> list[Any]:
    uptime = record.get("uptime") if record.get("state") == "RUNNING" else None
    return [record.get("name"), record.get("role"), record.get("state"), record.get("pid"),
            duration(uptime), record.get("restarts"),
            ",".join(str(p) for p in record.get("ports") or []),
            last_exit(record.get("last_exit"))]


def print_processes(out: Output, records: list[dict[str, Any]]) -> None:
    out.table(PROCESS_HEADERS, (process_row(r) for r in records), coloured=(2,))


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1048576:.1f} MiB"


def _liveness(value: dict[str, Any] | None) -> str:
    if not value:
        return "no probe configured"
    probe = value.get("last_probe")
    last = "no probe yet"
    if probe:
        verdict = "ok" if probe.get("ok") else "FAILED"
        last = f"last probe {verdict} at {clock(probe.get('at'))} ({probe.get('detail')})"
    return (f"{last}; {value.get('consecutive_failures', 0)} failures in a row, "
            f"{value.get('failures_total', 0)} in all")


def process_details(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The long form of one process record (``status -l``): (label, text) pairs."""
    limits = record.get("limits") or {}
    cpu = record.get("cpu_seconds")
    exit_reason = (record.get("last_exit") or {}).get("reason")
    return [
        ("command", " ".join(record.get("command") or [])),
        ("user", str(record.get("user") or "-")),
        ("cgroup", str(record.get("cgroup") or "- (process tree from the process table)")),
        ("limits", ", ".join(f"{k} {v}" for k, v in limits.items()) or "none"),
        ("usage", f"cpu {'-' if cpu is None else f'{cpu:.2f} s'}, memory "
                  f"{_mib(record.get('memory_bytes'))}, "
                  f"{record.get('oom_kills', 0)} OOM kills"),
        ("liveness", _liveness(record.get("liveness"))),
        ("logs", ", ".join(record.get("log_files") or []) or "-"),
        ("last exit", f"{last_exit(record.get('last_exit'))}"
                      + (f" ({exit_reason})" if exit_reason else "")),
    ]


def print_details(out: Output, records: list[dict[str, Any]]) -> None:
    for record in records:
        out.line()
        out.line(f"{record.get('name')}:")
        for label, text in process_details(record):
            out.line(f"  {label:<10} {text}")


def unknown(name: str, names: list[str]) -> ApiError:
    """2001 naming the valid programs (the daemon's message names only the bad one)."""
    return ApiError(PROCESS_NOT_FOUND,
                    f"no program named {name!r}; the programs are: {', '.join(names)}", 404,
                    target="name")


def with_names(api: Transport, error: ApiError, name: str) -> ApiError:
    """``error`` itself, unless it is 2001 for ``name``: then the same with the valid names."""
    if error.code != PROCESS_NOT_FOUND:
        return error
    try:
        names = [p["name"] for p in api.request("GET", "/api/v1/processes")]
    except ApiError:
        return error
    return unknown(name, names)


# --- status ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, api: Transport, out: Output) -> int:
    status = api.request("GET", "/api/v1/status")
    processes = api.request("GET", "/api/v1/processes")
    if args.names:
        by_name = {p["name"]: p for p in processes}
        for name in args.names:
            if name not in by_name:
                raise unknown(name, list(by_name))
        processes = [by_name[name] for name in dict.fromkeys(args.names)]
    if args.names_only:
        for record in processes:
            out.line(record["name"])
        return EXIT_OK

    def human() -> None:
        if not args.names:
            counts = ", ".join(f"{n} {state}" for state, n in
                               (status.get("counts") or {}).items() if n)
            out.line(f"ocp-agentd {status['version']}  pid {status['pid']}  "
                     f"up {duration(status.get('uptime'))}  host {status.get('host_id')}  "
                     f"{status.get('state')}  "
                     f"({status.get('programs')} programs: {counts or 'none'})")
            out.line()
        print_processes(out, processes)
        if args.long:
            print_details(out, processes)

    out.data({"daemon": status, "processes": processes}, human)
    return EXIT_OK


# --- start, stop, restart, verify -----------------------------------------------------


def _operation_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    if getattr(args, "force", False):
        body["force"] = True
    return body


def cmd_operate(args: argparse.Namespace, api: Transport, out: Output) -> int:
    action: str = args.command
    body = _operation_body(args)
    if args.name == "all":
        if action == "restart":
            api.request("POST", "/api/v1/agent/stop-all", body, wait=args.timeout)
            action = "start"
        result = api.request("POST", f"/api/v1/agent/{action}-all", body, wait=args.timeout)
        out.data(result, lambda: print_processes(out, result["processes"]))
        return EXIT_OK
    try:
        record = api.request("POST", path_of(args.name, action), body, wait=args.timeout)
    except ApiError as exc:
        raise with_names(api, exc, args.name) from None
    out.data(record, lambda: print_processes(out, [record]))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, api: Transport, out: Output) -> int:
    if args.name and args.name != "all":
        try:
            result = api.request("POST", path_of(args.name, "verify"))
        except ApiError as exc:
            raise with_names(api, exc, args.name) from None
        programs = [{"name": args.name, **result}]
    else:
        result = api.request("POST", "/api/v1/agent/verify")
        programs = result["programs"]

    def human() -> None:
        rows = [[p["name"], c["name"], "ok" if c["ok"] else "FAILED", c.get("detail")]
                for p in programs for c in p.get("checks", [])]
        out.table(("NAME", "CHECK", "RESULT", "DETAIL"), rows)

    out.data(result, human)
    if not result.get("ok"):
        failed = [p["name"] for p in programs if not p.get("ok")]
        out.error(f"verify failed for: {', '.join(failed)}")
        return EXIT_FAILED
    return EXIT_OK


# --- logs, signal ----------------------------------------------------------------------


def cmd_logs(args: argparse.Namespace, api: Transport, out: Output) -> int:
    query: dict[str, Any] = {"stream": "stderr" if args.stderr else "stdout",
                             "tail": args.lines}
    if args.follow:
        query["follow"] = 1
    try:
        response = api.open_stream(path_of(args.name, "logs"), query)
    except ApiError as exc:
        raise with_names(api, exc, args.name) from None
    sink = sys.stdout.buffer
    try:
        while chunk := response.read1(65536):
            sink.write(chunk)
            if args.follow:
                sink.flush()
    except (OSError, ProtocolError) as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise Unavailable(f"the log stream from ocp-agentd broke: {exc}") from None
    finally:
        response.close()
    sink.flush()
    if args.follow:
        raise Unavailable("ocp-agentd ended the log stream (it is stopping)")
    return EXIT_OK


def signal_name(text: str) -> str:
    """``hup``, ``SIGHUP``, ``1`` -> ``HUP`` (the names ``stop_signal`` takes). Raises
    argparse.ArgumentTypeError for anything that names no signal (a usage error, exit 2)."""
    # Imported here: the signal module builds its enums at import, start-up that only
    # this command needs.
    import signal

    name = text.strip().upper()
    if name.isdigit():
        try:
            name = signal.Signals(int(name)).name
        except ValueError:
            raise argparse.ArgumentTypeError(f"no signal number {text}") from None
    name = name[3:] if name.startswith("SIG") else name
    names = {s.name[3:] for s in signal.Signals if s.name.startswith("SIG")
             and not s.name.startswith(("SIG_", "SIGRT"))}
    if name not in names:
        raise argparse.ArgumentTypeError(
            f"no signal named {text!r}; e.g. HUP, USR1, USR2, TERM, INT, KILL")
    return name


def cmd_signal(args: argparse.Namespace, api: Transport, out: Output) -> int:
    try:
        record = api.request("POST", path_of(args.name, "signal"), {"signal": args.signal})
    except ApiError as exc:
        raise with_names(api, exc, args.name) from None

    def human() -> None:
        out.line(f"sent SIG{args.signal} to {record['name']} "
                 f"(pid {record.get('pid')})")

    out.data(record, human)
    return EXIT_OK


# --- reload, version --------------------------------------------------------------------


def cmd_reload(args: argparse.Namespace, api: Transport, out: Output) -> int:
    report = api.request("POST", "/api/v1/agent/reload")

    def human() -> None:
        for key in ("added", "removed", "changed", "unchanged"):
            names = report.get(key) or []
            out.line(f"{key + ':':<10} {', '.join(names) if names else '-'}")

    out.data(report, human)
    return EXIT_OK


def cmd_version(args: argparse.Namespace, api: Transport, out: Output) -> int:
    status = api.request("GET", "/api/v1/status")
    versions = {"client": __version__, "daemon": status.get("version"),
                "daemon_pid": status.get("pid")}

    def human() -> None:
        out.line(f"ocp-agentctl {__version__}")
        out.line(f"ocp-agentd   {status.get('version')} (pid {status.get('pid')})")

    out.data(versions, human)
    return EXIT_OK


# --- events -------------------------------------------------------------------------------


def describe_event(event: dict[str, Any]) -> str:
    """One event as a line: ``04:19:28.123  state  ocp_exporter  RUNNING -> BACKOFF
    (killed by SIGKILL)``."""
    when = clock(event.get("time"), millis=True)
    kind = str(event.get("kind"))
    if kind == "task":
        subject = f"task {event.get('task')}"
        if event.get("name"):
            subject += f" {event['name']!r}"
    elif kind == "subtask":
        subject = f"task {event.get('task')} subtask {event.get('subtask')}"
        if event.get("name"):
            subject += f" {event['name']!r}"
    elif kind == "reload":
        subject = ""
    else:
        subject = str(event.get("program") or "")
    change = ""
    if event.get("from") or event.get("to"):
        change = f"{event.get('from') or '-'} -> {event.get('to') or '-'}"
    reason = f"({event['reason']})" if event.get("reason") else ""
    return "  ".join(part for part in (when, kind, subject, change, reason)
                     if part)


def parse_sse(lines: Any) -> Any:
    """Server-sent events (https://html.spec.whatwg.org/#server-sent-events) from byte
    lines: yields ``(event name, data text)``; comments (keep-alives) are skipped."""
    name, data = "message", []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)  # "id:" is in the JSON too


def events(api: Transport, last: int = 0) -> Any:
    """Every event as a dict, as the daemon sends them (SPEC section 12), starting with
    the ``last`` most recent ones."""
    query = {"last": last} if last else None
    lines = api.stream_lines("/api/v1/events", query, timeout=STREAM_READ_SECONDS)
    for _, data in parse_sse(lines):
        try:
            yield json.loads(data)
        except ValueError:
            continue


def cmd_events(args: argparse.Namespace, api: Transport, out: Output) -> int:
    seen = 0
    for event in events(api, args.last):
        if args.kind and event.get("kind") not in args.kind:
            continue
        if out.json:
            out.dump(event, indent=None)
        else:
            out.line(describe_event(event))
        out.flush()
        seen += 1
        if args.count and seen >= args.count:
            return EXIT_OK
    raise Unavailable("ocp-agentd ended the event stream (it is stopping)")
