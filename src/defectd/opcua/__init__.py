"""OPC UA for the PLCs that do not speak MQTT: the station's results as nodes, events and a
``Trigger`` method (docs/opcua.md).

- ``config``: the ``[opcua]`` section (no asyncua import: the daemon validates it everywhere).
- ``certs``: ``defectd opcua cert`` (server certificate and key) and the users file.
- ``records``: the plain data the server shows (``VerdictRecord``, ``StationState``), the
  bounded hand-over from pipeline threads (``VerdictQueue``) and the verdict history ring.
- ``server``: ``OpcUaServer``, an asyncua server on its own thread and event loop (the optional
  ``defectd[opcua]`` extra; imported only when a station enables ``[opcua]``).
"""

from defectd.opcua.config import OpcUaConfig

__all__ = ["OpcUaConfig"]
