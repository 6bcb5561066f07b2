import sys
import types

import kolors_course.setup.envinfo as envinfo
import kolors_course.setup.install as install


def test_environment_report_has_the_basics():
    r = envinfo.environment_report()
    for key in ("python", "torch", "cuda_available", "disk_free_gb", "packages"):
        assert key in r
    assert r["packages"]["diffsynth"] == "1.1.9"
    assert r["packages"]["transformers"].split(".")[0] == "4"


def test_restart_detected_when_loaded_version_differs(monkeypatch):
    assert not [r for r in envinfo.restart_reasons() if r.package == "peft"]
    fake = types.ModuleType("peft")
    fake.__version__ = "0.0.1"
    monkeypatch.setitem(sys.modules, "peft", fake)
    reasons = envinfo.restart_reasons()
    assert any(r.package == "peft" and "0.0.1" in r.why for r in reasons)
    assert envinfo.needs_restart() is True


def test_restart_detected_when_installed_but_not_importable(monkeypatch):
    monkeypatch.delitem(sys.modules, "papermill", raising=False)
    monkeypatch.setattr(envinfo.importlib.util, "find_spec",
                        lambda name: None if name == "papermill" else object())
    assert any(r.package == "papermill" and "cannot import" in r.why for r in envinfo.restart_reasons())


def test_never_restarts_headless(capsys):
    assert envinfo.restart_kernel(force=True) is False
    assert "Not restarting" in capsys.readouterr().out


def test_pip_command_is_a_list_that_keeps_torch(tmp_path):
    import importlib.metadata as md
    keep = install.pinned_constraints()
    assert f"torch=={md.version('torch')}" in keep
    cmd = install.pip_command(constraints_file=tmp_path / "c.txt")
    assert isinstance(cmd, list) and cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[-2:] == ["-c", str(tmp_path / "c.txt")] and "-e" in cmd


def test_install_auto_does_nothing_when_installed(capsys):
    assert install.missing_requirements() == []
    assert install.install_kit(mode="auto") is False
    assert "nothing to do" in capsys.readouterr().out


def test_install_dry_run_shows_command(capsys):
    assert install.install_kit(mode="always", dry_run=True) is False
    out = capsys.readouterr().out
    assert "Keeping the installed torch==" in out and "pip install" in out


def test_the_environment_report_has_one_torch_row(capsys):
    from kolors_course.setup.envinfo import print_environment_report

    print_environment_report()
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rows.count("torch") == 1 and "diffsynth" in rows, rows
