"""pvgate-sim: Modbus devices served from the same device maps, with physics and faults."""
