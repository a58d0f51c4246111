"""Link workers: one per physical link, polling its devices one transaction at a time.

Owns: the order of work on a bus (live devices first, then retries, then probes), splitting
blocks a device refuses, online/offline/asleep state and its events, alarms from status bits,
the nameplate read. May import: clock/, the agent's base modules and drivers/.
"""

from agent.poller.state import DeviceState, Job, NightPolicy, Stamp, wall_stamp
from agent.poller.worker import LinkWorker

__all__ = ["DeviceState", "Job", "LinkWorker", "NightPolicy", "Stamp", "wall_stamp"]
