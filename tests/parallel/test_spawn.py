"""Rendezvous port choice for ranks started on this machine (parallel/spawn.py)."""

import socket

from megatron_align.parallel import spawn


def test_free_port_lies_below_the_ephemeral_range_and_is_bindable():
    low = spawn._ephemeral_low()
    for _ in range(20):
        port = spawn.free_port()
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free right after the pick


def test_free_port_skips_a_port_that_is_taken(monkeypatch):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    picks = iter([taken, taken, taken + 1 if taken + 1 < 65536 else taken - 1])

    class Rng:
        def randrange(self, lo, hi):
            return next(picks)

    monkeypatch.setattr(spawn.random, "SystemRandom", Rng)
    monkeypatch.setattr(spawn, "_ephemeral_low", lambda: 65536)
    try:
        assert spawn.free_port() != taken
    finally:
        held.close()


def test_ephemeral_low_falls_back_to_the_linux_default(tmp_path):
    assert spawn._ephemeral_low(str(tmp_path / "missing")) == 32768
    f = tmp_path / "range"
    f.write_text("40000\t60999\n")
    assert spawn._ephemeral_low(str(f)) == 40000
