"""Results to the PLCs: durable outbox and MQTT publisher."""
