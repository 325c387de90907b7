"""The daemons live in devkit.daemons (the demo starts them too); RuntimeDaemon is re-exported
for the benchmarks, which import it from here."""

from devkit.daemons import RuntimeDaemon

__all__ = ["RuntimeDaemon"]
