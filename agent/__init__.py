"""The long-running pvgate service, grouped by job (README.md, "How the code is organised").

Imports point one way, from the top down (tests/test_layers.py enforces it):

    cli -> commission, service -> config -> uplink, poller, energy -> store, clock -> (agent base) -> drivers

- ``cli``         the ``pvgate`` command line
- ``commission``  scan, probe, read, plan, bus budget, demo: the technician's tools
- ``service``     the running agent: wiring, reload, systemd supervision, health, status socket
- ``config``      the site file, checked and typed
- ``uplink``      MQTT: publisher, send window, messages, TLS, remote commands
- ``poller``      link workers: one per physical link, scheduling of polls on it
- ``energy``      counters to daily yields, and the daily report (agent/energy/__init__.py)
- ``store``       the SQLite buffer and its writer thread
- base modules here (``logutil``, the version) may be imported by every package.
"""

__version__ = "0.1.0"
