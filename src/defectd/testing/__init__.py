"""Real-but-local parts for tests and benchmarks: a Mosquitto broker on a free port
(``mosquitto``) and a clock that moves only when the code waits (``clock``). Nothing in the
station imports this package."""
