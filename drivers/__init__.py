"""The Modbus side of pvgate: links, read planning, decoding, device maps. Knows nothing of MQTT or SQLite."""
