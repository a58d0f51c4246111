"""Reusable test infrastructure: real mosquitto brokers, MQTT collectors and
subprocess handling for pvgate's tests (no mocks).

Modules:
    ports      free TCP ports and port readiness helpers
    procs      ``Proc``/``ProcRegistry`` subprocess handling, tool discovery
    broker     ``Broker``: a private mosquitto process with its own config
    collector  ``Collector`` (paho subscriber), ``MosquittoSub`` (real CLI), ``publish``
"""
