"""Where results go and what they record: never into the source tree by default; every benchmark runs
as a path and as a module; the `cattn` logger names itself and its level can be set."""
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cattn
from cattn.apps.results import git_commit, provenance, results_dir, source_tree

REPO = Path(__file__).resolve().parents[2]
BENCHES = ("kernels", "store", "ttft", "ttft_disk", "gpu_check", "compile_report", "tune", "vllm_multiturn", "replay_long")
SKIP = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".venv"}


def tree_snapshot(root: Path) -> dict:
    """Every file under ``root`` (outside caches and .git) with its size and modification time."""
    snap = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]
        for name in files:
            st = (Path(folder) / name).stat()
            snap[os.path.relpath(Path(folder) / name, root)] = (st.st_size, st.st_mtime_ns)
    return snap


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CATTN_RESULTS_DIR", raising=False)
    monkeypatch.delenv("OUT", raising=False)
    return tmp_path / "cache" / "cattn" / "results"


def test_results_dir_is_never_inside_the_source_tree(user_cache, tmp_path, monkeypatch):
    for inside in (REPO, REPO / "bench", REPO / "cattn" / "replay"):
        monkeypatch.chdir(inside)
        assert source_tree(inside) is not None and results_dir() == user_cache
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert source_tree(elsewhere) is None and results_dir() == elsewhere / "cattn-results"
    assert results_dir(tmp_path / "named") == tmp_path / "named" and (tmp_path / "named").is_dir()
    monkeypatch.setenv("CATTN_RESULTS_DIR", str(tmp_path / "from-env"))
    assert results_dir() == tmp_path / "from-env"
    assert results_dir(tmp_path / "named") == tmp_path / "named"      # a folder named on the command line wins


def test_provenance_records_version_commit_and_time(tmp_path):
    record = provenance()
    assert record["cattn"] == cattn.__version__
    stamp = datetime.datetime.fromisoformat(record["timestamp"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 60
    assert git_commit(tmp_path) is None                    # not a git work tree
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], capture_output=True, text=True, check=True)
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path) == head + "-dirty"


BOTH_WAYS = """
import runpy, sys
repo, names = sys.argv[1], sys.argv[2:]
base = [p for p in sys.path if p not in ("", repo)]     # `bench` importable only the way each form makes it
for name in names:
    for form in ("path", "module"):
        for mod in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
            del sys.modules[mod]
        if form == "path":      # python bench/NAME.py: the script's folder first on sys.path
            sys.path[:] = [f"{repo}/bench", *base]
            sys.argv = [f"{repo}/bench/{name}.py", "--help"]
            run = lambda: runpy.run_path(sys.argv[0], run_name="__main__")
        else:                   # python -m bench.NAME from the repository root
            sys.path[:] = [repo, *base]
            sys.argv = [name, "--help"]
            run = lambda: runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
        try:
            run()
        except SystemExit as exc:
            assert exc.code == 0, (name, form, exc.code)
        else:
            raise AssertionError(f"{name} {form}: --help did not exit")
        print(f"ok {name} {form}", file=sys.stderr)
"""


def test_every_benchmark_runs_as_a_path_and_as_a_module():
    # One process for all (torch imported once); each run sees only the sys.path its form gives.
    run = subprocess.run([sys.executable, "-c", BOTH_WAYS, str(REPO), *BENCHES], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stderr.splitlines() if line.startswith("ok ")] == [
        f"ok {name} {form}" for name in BENCHES for form in ("path", "module")]
    assert run.stdout.count("usage:") == 2 * len(BENCHES)
    # and the real thing once, as the README names it
    real = subprocess.run([sys.executable, "bench/kernels.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert real.returncode == 0 and real.stdout.startswith("usage:"), real.stderr[-2000:]


def test_default_runs_from_the_repository_root_leave_it_as_it_was(user_cache):
    """`cattn replay` with its default outputs and the store benchmark's CPU transfer run, from the
    repository root: results land in the user cache folder, with provenance; the tree is unchanged."""
    before = tree_snapshot(REPO)
    replay = subprocess.run([sys.executable, "-m", "cattn", "replay", "--sessions", "40", "--sweep", "0.5",
                             "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-2000:]
    store = subprocess.run([sys.executable, "bench/store.py", "--transfer", "32", "--repeats", "1"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert store.returncode == 0, store.stderr[-2000:]
    assert "32 tokens: resident x1 ..." in store.stdout                # progress shown as it runs
    assert tree_snapshot(REPO) == before
    for name, where in (("replay_paper.json", "environment"), ("store_cpu_transfer.json", "environment")):
        record = json.loads((user_cache / name).read_text())[where]
        assert record["cattn"] == cattn.__version__ and record["timestamp"] and "git_commit" in record
    assert {"replay_paper_hit_rate.png", "replay_paper_ttft.png"} <= {p.name for p in user_cache.iterdir()}


LOGGING = """
import logging, cattn
log = logging.getLogger("cattn.store.tiered.store")
log.warning("shown by default")
log.info("hidden by default")
cattn.set_verbosity("info")
log.info("shown after set_verbosity")
try:
    cattn.set_verbosity("loud")
except ValueError as exc:
    print(exc)
"""


def test_the_cattn_logger_names_itself_and_its_level_can_be_set():
    env = {k: v for k, v in os.environ.items() if k != "CATTN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-c", LOGGING], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == ["[cattn.store.tiered.store] WARNING: shown by default",
                                       "[cattn.store.tiered.store] INFO: shown after set_verbosity"]
    assert run.stdout.startswith("level must be one of debug, info, warning, error, critical")
    quiet = subprocess.run([sys.executable, "-c", LOGGING], capture_output=True, text=True, timeout=60,
                           env={**env, "CATTN_LOG_LEVEL": "error"})
    assert quiet.stderr.splitlines() == ["[cattn.store.tiered.store] INFO: shown after set_verbosity"]
    bad = subprocess.run([sys.executable, "-c", "import cattn"], capture_output=True, text=True, timeout=60,
                         env={**env, "CATTN_LOG_LEVEL": "loud"})
    assert bad.returncode != 0 and "ValueError: CATTN_LOG_LEVEL must be one of" in bad.stderr


def test_an_application_logging_config_takes_over_without_duplicate_lines():
    code = ("import logging, cattn\nlogging.basicConfig(format='app %(name)s %(message)s')\n"
            "logging.getLogger('cattn.chat.session').warning('once')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stderr.splitlines() == ["app cattn.chat.session once"]
