"""The password file: hashes, parsing with path:line errors, the check's cost and cache,
and atomic edits that keep comments, owner, group and a mode nobody else can read."""

from __future__ import annotations

import base64
import fcntl
import os
import re
import stat
import threading
import time

import pytest

from ocpp_edge.south import credentials
from ocpp_edge.south.credentials import (
    CredentialsError,
    PasswordFile,
    cid_problem,
    hash_password,
    remove_entry,
    set_entry,
    verify,
)

HASH_RE = re.compile(r"scrypt\$ln=14,r=8,p=1\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


@pytest.fixture(scope="module")
def hashes():
    """A few hashes made once: each costs a real scrypt."""
    return {b"right": hash_password(b"right"), b"other": hash_password(b"other")}


def write(path, text: str | bytes):
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.fixture
def count_scrypt(monkeypatch):
    """How many scrypt derivations the code under test runs."""
    calls = []
    real = credentials.hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(credentials.hashlib, "scrypt", counting)
    return calls


# --- ids ------------------------------------------------------------------------------

@pytest.mark.parametrize("cid", ["CP1", "a" * 48, "a:b", "é-ü", "with space", ".."])
def test_acceptable_ids(cid):
    assert cid_problem(cid) is None


@pytest.mark.parametrize("cid", ["", "a" * 49, "a/b", "a+b", "a#b", "a\x00b", "\t",
                                 "a\x7fb", "a\x85b", "a\x9fb"])
def test_refused_ids(cid):
    assert cid_problem(cid)


# --- hashes ---------------------------------------------------------------------------

def test_hash_format_is_salted_scrypt(hashes):
    m = HASH_RE.fullmatch(hashes[b"right"])
    assert m, hashes[b"right"]
    salt, key = (base64.b64decode(g + "=" * (-len(g) % 4)) for g in m.groups())
    assert (len(salt), len(key)) == (16, 32)
    again = hash_password(b"right")
    assert again != hashes[b"right"]  # a fresh salt each time
    assert b"right" not in hashes[b"right"].encode()


def test_verify_compares_exact_bytes(hashes):
    assert verify(hashes[b"right"], b"right")
    assert not verify(hashes[b"right"], b"right\n")
    assert not verify(hashes[b"right"], b"Right")
    assert not verify(hashes[b"right"], b"")
    binary = bytes(range(256))[::13]  # not UTF-8, contains ':' free bytes and NUL
    assert verify(hash_password(binary), binary)


def test_passwords_must_be_bytes(hashes):
    with pytest.raises(TypeError):
        verify(hashes[b"right"], "right")
    with pytest.raises(TypeError):
        hash_password("right")


@pytest.mark.parametrize("bad, why", [
    ("secret", "plain-text passwords are not accepted"),
    ("bcrypt$2b$xx", "unknown hash scheme 'bcrypt'"),
    ("scrypt$ln=14,r=8$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5", "malformed scrypt parameters"),
    ("scrypt$ln=30,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5", "out of range"),
    ("scrypt$ln=14,r=8,p=1$!!!$a2V5a2V5a2V5a2V5a2V5", "not base64"),
    ("scrypt$ln=14,r=8,p=1$c2FsdA$a2V5", "too short"),
])
def test_malformed_hashes_are_refused(bad, why):
    with pytest.raises(CredentialsError, match=re.escape(why)):
        verify(bad, b"x")


def test_other_parameters_still_verify():
    weaker = hash_password(b"pw", ln=10, r=4, p=2)
    assert weaker.startswith("scrypt$ln=10,r=4,p=2$")
    assert verify(weaker, b"pw") and not verify(weaker, b"pX")


# --- reading the file -----------------------------------------------------------------

def test_load_reads_entries_comments_and_last_colon(tmp_path, hashes):
    f = write(tmp_path / "pw", f"# site passwords\n\n   # indented comment\r\n"
                               f"CP1:{hashes[b'right']}\r\n"
                               f"a:b:c:{hashes[b'other']}\n"
                               f"é:{hashes[b'right']}")  # no final newline
    os.chmod(f, 0o600)
    pf = PasswordFile.load(f)
    assert len(pf) == 3
    assert pf.ids() == ["CP1", "a:b:c", "é"]
    assert pf.known("a:b:c") and "CP1" in pf and not pf.known("a:b")
    assert pf.check("a:b:c", b"other") and not pf.check("a:b:c", b"right")
    assert pf.check("é", b"right")
    assert pf.warnings == []


def test_missing_file_is_distinguishable(tmp_path):
    with pytest.raises(FileNotFoundError):
        PasswordFile.load(tmp_path / "nope")


def test_unreadable_file_is_a_credentials_error(tmp_path):
    with pytest.raises(CredentialsError, match=re.escape(f"{tmp_path}: cannot read")):
        PasswordFile.load(tmp_path)  # a directory


@pytest.mark.parametrize("line, why", [
    ("CP9 no colon", "expected <charge point id>:<hash>"),
    ("CP9:secret", "plain-text passwords are not accepted"),
    ("CP9:bcrypt$2b$12$abc", "unknown hash scheme 'bcrypt'"),
    ("a/b:{h}", "contains '/', '+', '#' or a control character"),
    (":{h}", "the charge point id is empty"),
    ("x" * 49 + ":{h}", "longer than 48 characters"),
    ("CP1:{h}", "second entry for 'CP1' (the first is on line 2)"),
])
def test_malformed_lines_name_path_and_line(tmp_path, hashes, line, why):
    h = hashes[b"right"]
    f = write(tmp_path / "pw", f"# header\nCP1:{h}\n{line.format(h=h)}\n")
    with pytest.raises(CredentialsError) as info:
        PasswordFile.load(f)
    assert str(info.value).startswith(f"{f}:3: ") and why in str(info.value)
    assert (info.value.path, info.value.line) == (str(f), 3)


def test_non_utf8_line_is_named(tmp_path, hashes):
    f = write(tmp_path / "pw", b"# ok\n\xff\xfe:" + hashes[b"right"].encode() + b"\n")
    with pytest.raises(CredentialsError, match=re.escape(f"{f}:2: not UTF-8 text")):
        PasswordFile.load(f)


def test_world_readable_file_gives_a_warning(tmp_path, hashes):
    f = write(tmp_path / "pw", f"CP1:{hashes[b'right']}\n")
    os.chmod(f, 0o640)
    assert PasswordFile.load(f).warnings == []
    os.chmod(f, 0o644)
    [warning] = PasswordFile.load(f).warnings
    assert "readable by every user" in warning and str(f) in warning


# --- checking -------------------------------------------------------------------------

def test_unknown_id_costs_one_hash_like_a_known_one(tmp_path, hashes, count_scrypt):
    pf = PasswordFile.load(write(tmp_path / "pw", f"CP1:{hashes[b'right']}\n"))
    assert not pf.check("CP2", b"right")
    assert len(count_scrypt) == 1
    assert not pf.check("CP1", b"wrong")
    assert len(count_scrypt) == 2


def test_success_is_cached_until_reload(tmp_path, hashes, count_scrypt):
    f = write(tmp_path / "pw", f"CP1:{hashes[b'right']}\nCP2:{hashes[b'right']}\n")
    pf = PasswordFile.load(f)
    assert pf.check("CP1", b"right") and len(count_scrypt) == 1
    assert pf.check("CP1", b"right") and len(count_scrypt) == 1  # no second scrypt
    assert not pf.check("CP1", b"wrong") and len(count_scrypt) == 2  # failures are not
    assert not pf.check("CP1", b"right\n") and len(count_scrypt) == 3
    assert pf.check("CP2", b"right") and len(count_scrypt) == 4  # per id
    assert b"right" not in b"".join(pf._ok.values())  # tags, not passwords
    # The password changes in the file: a reload forgets the cached success.
    write(f, f"CP1:{hashes[b'other']}\nCP2:{hashes[b'right']}\n")
    reloaded = PasswordFile.load(f)
    assert not reloaded.check("CP1", b"right")
    assert reloaded.check("CP1", b"other")


def test_default_parameters_are_slow_enough():
    # The figure in the module docstring; a floor only, so a fast machine cannot fail it.
    start = time.perf_counter()
    verify(hash_password(b"x"), b"x")
    assert (time.perf_counter() - start) / 2 > 0.005


# --- editing --------------------------------------------------------------------------

def test_set_entry_creates_a_private_file_with_the_directory_group(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir()
    if os.geteuid() == 0:
        os.chown(directory, -1, 4242)
    f = directory / "passwords"
    assert set_entry(f, "CP1", b"k" * 20) is False
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == (4242 if os.geteuid() == 0 else os.getegid())
    assert PasswordFile.load(f).check("CP1", b"k" * 20)
    assert sorted(os.listdir(directory)) == ["passwords"]  # no temporary file left


def test_set_entry_keeps_other_lines_in_place(tmp_path, hashes):
    original = (f"# comment one\r\nCP1:{hashes[b'right']}\r\n\n"
                f"  # two\nCP2:{hashes[b'other']}")
    f = write(tmp_path / "pw", original)
    assert set_entry(f, "CP1", b"new-key") is True
    lines = f.read_bytes().split(b"\n")
    assert lines[0] == b"# comment one\r" and lines[2:4] == [b"", b"  # two"]
    assert lines[1].startswith(b"CP1:scrypt$") and lines[1].endswith(b"\r")
    assert lines[4] == f"CP2:{hashes[b'other']}".encode()
    assert set_entry(f, "CP3", b"third") is False  # appended after the unterminated line
    pf = PasswordFile.load(f)
    assert pf.ids() == ["CP1", "CP2", "CP3"]
    assert pf.check("CP1", b"new-key") and not pf.check("CP1", b"right")
    assert pf.check("CP2", b"other") and pf.check("CP3", b"third")


def test_rewrite_keeps_owner_and_group_and_drops_others(tmp_path, hashes):
    f = write(tmp_path / "pw", f"CP1:{hashes[b'right']}\n")
    os.chmod(f, 0o664)
    if os.geteuid() == 0:
        os.chown(f, 1234, 4321)
    before = os.stat(f)
    set_entry(f, "CP2", b"two")
    after = os.stat(f)
    assert stat.S_IMODE(after.st_mode) == 0o660
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # replaced, not rewritten in place


def test_edit_through_a_symbolic_link_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real)
    set_entry(link, "CP1", b"one")
    assert link.is_symlink() and PasswordFile.load(real).check("CP1", b"one")


def test_set_entry_refuses_a_broken_file_and_leaves_it(tmp_path, hashes):
    content = f"CP1:{hashes[b'right']}\nCP2:plaintext\n"
    f = write(tmp_path / "pw", content)
    with pytest.raises(CredentialsError, match=re.escape(f"{f}:2: ")):
        set_entry(f, "CP3", b"x")
    assert f.read_text() == content


@pytest.mark.parametrize("cid, password, why", [
    ("a/b", b"x", "contains '/'"), ("", b"x", "is empty"), ("CP1", b"", "password is empty"),
])
def test_set_entry_refuses_bad_input(tmp_path, cid, password, why):
    with pytest.raises(CredentialsError, match=re.escape(why)):
        set_entry(tmp_path / "pw", cid, password)
    assert not (tmp_path / "pw").exists()


def test_set_entry_needs_the_directory(tmp_path):
    with pytest.raises(CredentialsError, match="no such directory"):
        set_entry(tmp_path / "missing" / "pw", "CP1", b"x")


def test_remove_entry(tmp_path, hashes):
    f = write(tmp_path / "pw", f"# keep\nCP1:{hashes[b'right']}\nCP2:{hashes[b'other']}\n")
    assert remove_entry(f, "CP3") is False
    assert remove_entry(f, "CP1") is True
    assert f.read_text() == f"# keep\nCP2:{hashes[b'other']}\n"
    assert remove_entry(tmp_path / "absent", "CP1") is False
    assert not (tmp_path / "absent").exists()


def test_edits_wait_for_each_other(tmp_path):
    """Two editors at once must not lose an entry: an edit waits for the directory lock."""
    f = tmp_path / "pw"
    set_entry(f, "CP1", b"one")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another editor holds the lock
    worker = threading.Thread(target=set_entry, args=(f, "CP2", b"two"))
    try:
        worker.start()
        time.sleep(0.5)  # scrypt is done long before; the write must still wait
        assert PasswordFile.load(f).ids() == ["CP1"]
    finally:
        os.close(fd)  # releases the lock
        worker.join(10)
    assert PasswordFile.load(f).ids() == ["CP1", "CP2"]
