"""The road to the county center: MQTT publishing, message building, TLS, remote commands.

Owns: the paho session and its thread, the send window (live, resend and backlog lanes),
payloads (Contract 2), the TLS context, and the command handler. Takes its settings as the
plain values in :mod:`agent.uplink.settings`, never the site file. May import: store/, the
agent's base modules and drivers/.
"""
