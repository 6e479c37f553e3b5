"""The target of the downlink bench: one command that does nothing and replies."""

from edge import Service

svc = Service("benchtarget", heartbeat=0)


@svc.command("noop")
async def noop(i: int) -> dict[str, int]:
    return {"i": i}
