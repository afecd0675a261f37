"""The service: builds the pipeline from config and runs it under systemd."""
