"""A new user's mistakes get an error that names the argument, before anything runs."""
import errno
import os

import pytest

from cattn.apps import cli


def test_chat_session_refuses_max_new_tokens_zero(tiny_model, byte_tokenizer):
    from cattn import ChatSession
    from cattn.hf import apply_cattn

    chat = ChatSession(apply_cattn(tiny_model("llama")), byte_tokenizer, session_id="s")
    try:
        for bad in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match=rf"max_new_tokens must be a positive int, got {bad!r}"):
                chat.send("hi", max_new_tokens=bad)
        assert chat.turns == [] and chat.messages == []          # nothing ran, nothing recorded
    finally:
        chat.close()


def test_demo_refuses_a_model_with_dynamic_rope_by_naming_it(tiny_model, byte_tokenizer, tmp_path):
    folder = tmp_path / "dynamic"
    tiny_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
               ).save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    with pytest.raises(SystemExit, match=rf"--model {folder}: .*'dynamic'"):
        cli.main(["demo", "--model", str(folder)])


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    (["--turns", "0"], "--turns: must be in 1..8, got 0"), (["--turns", "x"], "--turns: not an integer")])
def test_demo_flags_are_checked_before_the_model_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_load_model_on_a_folder_that_is_no_model_says_so(tmp_path, byte_tokenizer):
    from cattn.hf import load_model

    with pytest.raises(FileNotFoundError, match=r"model path '.*empty' holds no config.json"):
        load_model((tmp_path / "empty").mkdir() or tmp_path / "empty")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer \(none of tokenizer.json"):
        load_model(config_only)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_model(tmp_path / "missing")


def test_disk_tier_on_a_read_only_directory_names_root(tmp_path, monkeypatch):
    from cattn.store import DiskTier

    real_open = os.open

    def read_only_fs(path, *args, **kwargs):     # as a read-only mount answers (the tests may run as root,
        if str(path).startswith(str(tmp_path)):  # for whom a mode-0555 folder is writable)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("cattn.store.lower.disk.os.open", read_only_fs)
    with pytest.raises(ValueError, match=r"root: the disk tier cannot write in '.*' \(Read-only file system\)"):
        DiskTier(tmp_path / "store", 1 << 20)


def test_disk_tier_under_a_file_names_root(tmp_path):
    from cattn.store import DiskTier

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"root: the disk tier cannot write in '.*a-file/store'"):
        DiskTier(tmp_path / "a-file" / "store", 1 << 20)
