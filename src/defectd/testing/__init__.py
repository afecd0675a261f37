"""Real-but-local parts for tests and benchmarks: a Mosquitto broker on a free port
(``mosquitto``), a clock that moves only when the code waits (``clock``), a stand-in for
systemd's notify socket (``notify``), a disk kept full (``disk``) and a polling wait
(``wait``). Nothing in the station imports this package."""
