import subprocess
import sys

from vlfast.cli import main, optional_packages


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ema_update_ [cpu]" in out and "torch" in out and "native extension" in out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "vlfast", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backends per op" in r.stdout


def test_optional_packages_detected_without_import():
    opt = optional_packages()
    assert set(opt) == {"xformers", "deepspeed", "apex"}
    assert all(isinstance(v, str) and v for v in opt.values())
