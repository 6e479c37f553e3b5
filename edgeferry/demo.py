"""``edgeferry demo``: a whole site and its cloud on this machine, live, through an outage.

Simulated devices publish to the local broker; the aggregator and rules services react;
the gateway stores everything and carries it through a chaos link to the cloud broker,
where ingest writes it to SQLite (edgeferry/demosite.py starts them). At ``outage_at``
the link is cut for ``outage_for`` seconds; during the outage the cloud side queues a
``set_interval`` command for one device and a new desired interval for another, which
reach the site and apply when the link returns. The dashboard (edgeferry/dashboard.py,
the same as ``edgeferry top``) shows it live. At the end the devices' manifest is
checked against the sink (sent, delivered, lost, duplicated), and the command's and the
desired state's outcome; the exit status is 1 if anything was lost, duplicated or not
applied (130 after Ctrl-C). ``--report`` writes the run as one HTML page
(edgeferry/report.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from edgeferry.demomodel import (
    CMD_INTERVAL,
    CMD_TARGET,
    SHADOW_INTERVAL,
    SHADOW_TARGET,
    DemoOptions,
    Run,
    device_name,
)
from edgeferry.demosite import NODE, DemoSite
from edgeferry.siteview import SiteWatcher

__all__ = ["DemoOptions", "run_demo"]

MARKER = ".edgeferry-demo"


def _prepare(data: Path | None) -> tuple[Path, bool]:
    """The data directory (created; a previous demo's files in it removed) and whether it
    is a temporary one."""
    if data is None:
        return Path(tempfile.mkdtemp(prefix="edgeferry-demo-")), True
    data = data.resolve()
    if data.exists() and any(data.iterdir()):
        if not (data / MARKER).exists():
            raise ValueError(f"--data {data} is not empty and not a previous demo's directory")
        for child in data.iterdir():
            if child.name != MARKER and child.suffix != ".html":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    data.mkdir(parents=True, exist_ok=True)
    (data / MARKER).write_text("edgeferry demo data; `edgeferry demo --data` replaces it\n")
    return data, False


def run_demo(opts: DemoOptions, console: Console | None = None) -> int:
    out = console or Console()
    problem = opts.check()
    if problem:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {problem}", highlight=False)
        return 2
    try:
        data, temporary = _prepare(opts.data)
    except (ValueError, OSError) as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    site = DemoSite(data, opts.devices, opts.duration, opts.seed)
    if len(str(site.store).encode()) + 5 > 100:  # gateway/health.py: <store>.sock
        Console(stderr=True, soft_wrap=True).print(
            f"[red]error:[/red] --data {data} is too long a path: the gateway's status socket "
            f"({site.store}.sock) must fit in a Unix socket path (about 100 bytes)", highlight=False)
        if temporary:
            shutil.rmtree(data, ignore_errors=True)
        return 2
    code = 1
    try:
        out.print(f"[bold]edgeferry demo[/bold]: {opts.devices} devices, {opts.duration:g} s, cloud link cut "
                  f"at {opts.outage_at:g} s for {opts.outage_for:g} s; data in {data}", highlight=False,
                  soft_wrap=True)
        site.start_brokers()
        code = asyncio.run(_main(site, opts, out))
    except KeyboardInterrupt:
        code = 130
    except AssertionError as e:  # a process did not come up: its log tail is in the message
        Console(stderr=True, soft_wrap=True).print(f"[red]demo failed:[/red] {e}", highlight=False)
        code = 1
    finally:
        for p in site.procs.values():  # only if the loop never got to close them
            if p.running:
                p.kill9()
        for b in (site.edge, site.cloud):
            if b is not None:
                b.close()
        if temporary:
            shutil.rmtree(data, ignore_errors=True)
    try:
        if not temporary and code != 130:
            out.print(f"data kept in {data}: sink sqlite:{site.sink_path}, manifest {site.manifest}, "
                      f"the run's time series {data / 'run.json'}, logs {site.logs}", highlight=False, soft_wrap=True)
        if code == 130:
            out.print("interrupted: every process stopped")
    except OSError:  # the terminal is gone (SIGHUP)
        pass
    return code


async def _main(site: DemoSite, opts: DemoOptions, out: Console) -> int:
    loop = asyncio.get_running_loop()
    abort = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        loop.add_signal_handler(sig, abort.set)
    run = Run()
    watcher: SiteWatcher | None = None
    tasks: list[asyncio.Task[Any]] = []
    try:
        if await _aborted(asyncio.create_task(site.start(), name="start"), abort):
            return 130
        assert site.edge is not None
        watcher = SiteWatcher(site.edge.url, site.store, sink=site.sink, node=NODE)
        tasks.append(asyncio.create_task(watcher.run(), name="watcher"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await watcher.connected.wait()
        out.print(f"site: local broker {site.edge.url}, gateway store {site.store}; in another terminal: "
                  f"edgeferry top --local {site.edge.url} --store {site.store}", highlight=False, soft_wrap=True)
        fleet = site.start_fleet()
        run.t0 = site.fleet_started
        run.note(f"{opts.devices} devices started; brokers, gateway, ingest, aggregator and rules running")
        from edgeferry.demoview import sample_loop

        story = asyncio.create_task(_story(site, opts, run, fleet, watcher), name="story")
        tasks.append(asyncio.create_task(sample_loop(watcher, run, opts, out, story), name="samples"))
        if await _aborted(story, abort):
            return 130
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()
        from edgeferry.demoview import finish

        return finish(site, opts, run, out)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if watcher is not None:
            watcher.close()
        await site.close()


async def _aborted(task: asyncio.Task[Any], abort: asyncio.Event) -> bool:
    """Wait for ``task`` or ``abort``: True if aborted (``task`` cancelled and awaited);
    otherwise the task's exception, if any, is raised here."""
    stopper = asyncio.create_task(abort.wait(), name="abort")
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if abort.is_set():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True
    task.result()
    return False


async def _until(run: Run, seconds: float) -> None:
    await asyncio.sleep(max(0.0, run.t0 + seconds - time.time()))


async def _story(site: DemoSite, opts: DemoOptions, run: Run, fleet: Any, watcher: SiteWatcher) -> None:
    """The scenario: outage, commands from the cloud during it, the end of the fleet, the
    drain; returns once everything the devices sent was confirmed by the cloud side."""
    await _until(run, opts.outage_at)
    await site.cut()
    run.marks["outage_start"] = time.time()
    run.note("[red]cloud link cut[/red]: the gateway keeps storing, the backlog grows")
    await asyncio.sleep(min(3.0, opts.outage_for / 3))
    await _send_downlink(site, run)
    await _until(run, opts.outage_at + opts.outage_for)
    await site.up()
    run.marks["outage_end"] = time.time()
    run.note("[green]cloud link back[/green]: the gateway drains, commands come down")
    rc = await asyncio.to_thread(fleet.wait, opts.duration + 60)
    run.marks["fleet_end"] = time.time()
    run.note(f"devices stopped (exit {rc}); waiting for the last records to reach the cloud")
    deadline = time.time() + 60
    while time.time() < deadline:
        snap = watcher.history[-1] if watcher.history else None
        if snap is not None and snap["gateway"] and _settled(site, run, snap):
            break
        await asyncio.sleep(0.5)
    run.marks["end"] = time.time()


def _settled(site: DemoSite, run: Run, snap: dict[str, Any]) -> bool:
    if any(lane["records"] for lane in snap["lanes"].values()) or snap["link"]["state"] != "up":
        return False
    cmd = next((c for c in snap.get("commands") or [] if c["id"] == run.command), None)
    if cmd is None or cmd["state"] not in ("succeeded", "failed", "rejected", "expired"):
        return False
    from gateway.cloudstate import CloudState

    state = CloudState.for_sink(site.sink)
    try:
        sh = state.shadow(NODE, device_name(SHADOW_TARGET, site.devices))
    finally:
        state.close()
    return bool(sh and isinstance(sh.get("reported"), dict) and sh["reported"].get("interval") == SHADOW_INTERVAL)


async def _send_downlink(site: DemoSite, run: Run) -> None:
    """What ``edgeferry cmd send`` and ``edgeferry shadow set`` do (gateway/cloudstate.py,
    then a publish for a site that is online: this one is not, so ingest offers both
    again when its gateway says hello)."""
    import json

    from gateway.cloudstate import CloudState
    from gateway.cloudsync import publish_once
    from gateway.topics import cmd_topic, desired_topic

    target = device_name(CMD_TARGET, site.devices)
    thing = device_name(SHADOW_TARGET, site.devices)
    state = CloudState.for_sink(site.sink)
    try:
        cid = state.add_command(NODE, target, "set_interval", {"interval": CMD_INTERVAL}, 600.0)
        offer = state.offer(cid)
        version = state.set_desired(NODE, thing, {"interval": SHADOW_INTERVAL}, None)
    finally:
        state.close()
    run.command, run.desired_version = cid, version
    run.marks["command_sent"] = time.time()
    run.note(f"cloud: [bold]cmd send[/bold] set_interval {CMD_INTERVAL:g} s -> {target} (queued, site offline)")
    run.note(f"cloud: [bold]shadow set[/bold] {thing} desired interval {SHADOW_INTERVAL:g} s (v{version})")
    wire = {k: offer[k] for k in ("id", "target", "name", "args", "ttl_ms")} if offer else None
    messages = [(desired_topic(NODE, thing),
                 json.dumps({"thing": thing, "version": version, "desired": {"interval": SHADOW_INTERVAL}}).encode())]
    if wire is not None:
        messages.insert(0, (cmd_topic(NODE, cid), json.dumps(wire).encode()))
    assert site.cloud is not None
    with contextlib.suppress(Exception):
        await publish_once(site.cloud.url, "edgeferry-demo-operator", messages)
