"""The local Ray head of `tli pipeline run`: started again when Ray loses a start-up race."""

import socket

import pytest

from tli import rayenv
from tli.pipeline import head


@pytest.mark.slow  # a failed and a good start of a real head: about a minute here
def test_a_head_that_loses_a_port_race_is_started_again(monkeypatch, capsys) -> None:
    """A port taken between tli's pick and Ray's bind (a busy machine): `ray start` fails with
    Ray's port message, and the head is started once more on fresh ports."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    real, calls = rayenv.free_ports, []

    def first_with_a_taken_port(n: int) -> list[int]:
        ports = real(n)
        calls.append(n)
        return [taken.getsockname()[1], *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(rayenv, "free_ports", first_with_a_taken_port)
    try:
        with head.local_head(num_cpus=1) as address:
            from ray.job_submission import JobSubmissionClient

            assert JobSubmissionClient(address).list_jobs() == []
    finally:
        taken.close()
    assert len(calls) == 2
    assert capsys.readouterr().out.count("starting a local Ray head") == 2
