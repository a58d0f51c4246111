"""The technician's tools: bus scan, probe and read, the read plan and bus budget, the demo.

Owns: ``pvgate scan``, ``read``, ``plan`` and ``demo``, and the bus-time arithmetic that
``check`` warns with. Runs no agent. May import: config/, poller, store/, the agent's base
modules and drivers/.
"""
