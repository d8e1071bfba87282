"""Which Ray a sweep without --address joins: the cluster this machine runs, never a dead one's leftovers."""
import socket

from orchestrator.launch import running_local_cluster


def test_a_live_cluster_is_joined_and_a_dead_ones_address_file_is_ignored(tmp_path, capsys):
    address_file = tmp_path / "ray_current_cluster"
    assert running_local_cluster(address_file) is None  # no file: a local Ray of its own
    assert capsys.readouterr().err == ""

    with socket.socket() as listening:  # a head's GCS port: something answers there
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        live = f"127.0.0.1:{listening.getsockname()[1]}"
        address_file.write_text(live + "\n")
        assert running_local_cluster(address_file) == live

    # the same file after that Ray was killed: nothing listens (Ray itself would wait on it for minutes)
    assert running_local_cluster(address_file) is None
    assert capsys.readouterr().err == (f"launch: {address_file} names a Ray cluster at '{live}' that does not "
                                       "answer: starting a local Ray\n")
