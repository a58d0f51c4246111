"""The running agent: wiring, reload, systemd supervision, health and the status socket.

Owns: :mod:`~agent.service.runtime` (the only module that knows every part and builds them),
reload, on-demand reads, sd_notify and the watchdog, health and status snapshots, the
``pvgate status`` socket. The wired parts never import the wiring back: health, supervision
and reload see the agent through Protocols. May import: config/, uplink/, poller, store/, the
agent's base modules and drivers/.
"""
