"""What subprocess mode's sandbox hides and how its bwrap command line is built (no processes:
tests/integration/test_policy_isolation.py runs the real thing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from airfleet.policy import sandbox


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:////srv/airfleet/airfleet.db", "/srv/airfleet/airfleet.db"),
    ("sqlite+pysqlite:////srv/a.db?timeout=30", "/srv/a.db"),
    ("sqlite:///relative.db", "relative.db"),
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("postgresql+psycopg://airfleet:pw@db/airfleet", None),
])
def test_the_store_file_of_a_database_url(url, path):
    assert sandbox._sqlite_file(url) == (Path(path) if path else None)


def test_hidden_paths_come_from_the_configuration_resolved(tmp_path, monkeypatch):
    home, keys, store, cfg = (tmp_path / n for n in ("airflow", "vault-keys", "store", "cfg"))
    for folder in (home, keys, store, cfg):
        folder.mkdir()
    (cfg / "airflow.cfg").write_text("")
    (tmp_path / "keys-link").symlink_to(keys)
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("AIRFLEET_KEYS_DIR", str(tmp_path / "keys-link"))
    monkeypatch.setenv("AIRFLEET_DATABASE_URL", f"sqlite:///{store / 'airfleet.db'}")
    monkeypatch.setenv("AIRFLOW_CONFIG", str(cfg / "airflow.cfg"))
    monkeypatch.setenv("HOME", str(tmp_path / "worker-home"))  # absent: nothing to hide
    assert sandbox.hidden_paths() == sorted([home, keys, store, cfg / "airflow.cfg"])


def test_a_secret_path_that_is_the_root_cannot_be_hidden(monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", "/")
    with pytest.raises(ValueError, match="is /"):
        sandbox.hidden_paths()


def test_the_interpreter_is_bound_back_under_a_hidden_home_and_secrets_inside_it_rehidden():
    home, python = Path("/home/worker"), Path("/home/worker/.pyenv/versions/3.11.7")
    secret = python / "keys"  # a secret inside what must be bound back
    argv = sandbox.bwrap_argv("bwrap", [home, secret], [python, Path("/usr")],
                              setpriv="setpriv")
    text = " ".join(argv)
    assert text.startswith("bwrap --ro-bind / / --dev /dev --proc /proc")
    assert ("--perms 0755 --tmpfs /home/worker --perms 0755 --dir /home/worker/.pyenv "
            "--perms 0755 --dir /home/worker/.pyenv/versions --ro-bind /home/worker/.pyenv/"
            "versions/3.11.7 /home/worker/.pyenv/versions/3.11.7 --perms 0755 --tmpfs "
            "/home/worker/.pyenv/versions/3.11.7/keys --perms 01777 --tmpfs /tmp/policy "
            "--chdir /tmp/policy ") in text
    assert "--perms 01777 --tmpfs /tmp" in text and "/usr" not in argv  # /usr: not hidden
    for flag in ("--unshare-pid", "--unshare-net", "--die-with-parent"):
        assert flag in argv
    assert argv[-9:] == ["--", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def test_a_worker_that_is_not_root_drops_nothing_and_skips_what_tmp_replaces():
    argv = sandbox.bwrap_argv("bwrap", [Path("/tmp/airflow"), Path("/srv/keys")],
                              [Path("/usr")], setpriv=None)
    assert "setpriv" not in argv and argv[-1] == "--"
    assert "/tmp/airflow" not in argv  # the fresh /tmp holds nothing of the host's
    assert argv.count("/srv/keys") == 1 and "/usr" not in argv
