"""pvgate-center: a reference ingest for the county center (MQTT 5 shared subscription -> PostgreSQL)."""
