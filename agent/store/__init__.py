"""The durable queue between polling and publishing: the SQLite buffer and its writer thread.

Owns: the buffer file (schema, seq, unsent marks, room and pruning, identities, CSV export) and
the thread that commits polled records to it. May import: the agent's base modules and drivers/
(core types, errors). Nothing here knows MQTT, Modbus or the site file.
"""
