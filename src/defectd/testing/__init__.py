"""Real-but-local parts for tests and benchmarks: a Mosquitto broker on a free port
(``mosquitto``), a clock that moves only when the code waits (``clock``) and a stand-in for
systemd's notify socket (``notify``). Nothing in the station imports this package."""
