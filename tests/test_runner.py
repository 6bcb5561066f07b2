
import json
import os

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

import kolors_course.cli as cli
import kolors_course.runner as runner


def _notebook(path, body):
    params = new_code_cell('profile = "tiny"\nout_dir = "runs/x"\nanswer = 1')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell("x = 1"), new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_failure_names_notebook_cell_and_error(tmp_path, capsys):
    nb = _notebook(tmp_path / "99_broken.ipynb", "y = 2\nz = y + 1\nassert answer == 2, 'answer must be 2'\nw = 3")
    code = cli.main(["run", str(nb), "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "99_broken" in err and "cell In [4]" in err and "answer must be 2" in err
    # the line that raised, not the cell's first line
    assert "at `assert answer == 2" in err and "y = 2" not in err
    failed = tmp_path / "out" / "notebooks" / "99_broken.failed.ipynb"
    assert failed.exists() and failed.name in err


def test_a_rerun_that_fails_keeps_the_finished_copy_and_the_summary_keeps_the_other_notebooks(tmp_path):
    first = _notebook(tmp_path / "01_first.ipynb", "pass")
    second = _notebook(tmp_path / "02_second.ipynb", "assert answer == 1, 'answer must be 1'\nprint('done')")
    out = tmp_path / "out"
    assert [r.status for r in runner.run_notebooks([str(first), str(second)], out=out, quiet=True)] == ["ok", "ok"]
    done = out / "notebooks" / "02_second.ipynb"
    before = done.read_bytes()
    # 02 alone, with a value that fails it
    results = runner.run_notebooks([str(second)], out=out, parameters={"answer": 5}, quiet=True)
    assert results[0].status == "failed" and results[0].output.endswith("02_second.failed.ipynb")
    assert done.read_bytes() == before
    assert (out / "notebooks" / "02_second.failed.ipynb").exists()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert {e["notebook"]: e["status"] for e in summary["results"]} == {"01_first": "ok", "02_second": "failed"}
    # fixed: the finished copy is replaced and the failed one goes
    assert runner.run_notebooks([str(second)], out=out, quiet=True)[0].status == "ok"
    assert not (out / "notebooks" / "02_second.failed.ipynb").exists()
    assert not list((out / "notebooks").glob("*.running.ipynb"))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [e["status"] for e in summary["results"]] == ["ok", "ok"]


def test_the_kernels_own_stderr_goes_to_a_log_beside_the_notebook(tmp_path, capfd):
    """What the kernel process writes to its stderr outside a cell's sys.stderr (ipykernel's log, a C
    library) lands in ``<notebook>.kernel.log``, not in the middle of the run's summary; a
    notebook whose kernel wrote nothing leaves no log, and a failure names the log."""
    quiet = _notebook(tmp_path / "01_quiet.ipynb", "print('fine')")
    loud = _notebook(tmp_path / "02_loud.ipynb",
                     "import os\nos.write(2, b'written to the kernel fd 2\\n')\nassert answer == 2, 'answer must be 2'")
    out = tmp_path / "out"
    assert cli.main(["run", str(quiet), str(loud), "--out", str(out)]) == 1
    captured = capfd.readouterr()
    assert "written to the kernel fd 2" not in captured.out + captured.err
    log = out / "notebooks" / "02_loud.kernel.log"
    assert "written to the kernel fd 2" in log.read_text()
    assert not (out / "notebooks" / "01_quiet.kernel.log").exists()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    failed = [r for r in summary["results"] if r["status"] == "failed"]
    assert [r["notebook"] for r in failed] == ["02_loud"] and "02_loud.kernel.log" in failed[0]["error"]


def test_a_stopped_run_writes_its_summary_says_how_to_go_on_and_leaves_no_kernel(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    nb = _notebook(tmp_path / "96_slow.ipynb", "import time\nprint('started', flush=True)\ntime.sleep(120)")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "kolors_course.cli", "run", str(nb), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running = out / "notebooks" / "96_slow.running.ipynb"
    deadline = time.time() + 120
    while time.time() < deadline and "started" not in (running.read_text() if running.exists() else ""):
        time.sleep(0.5)
    assert running.exists(), "the kernel never started the slow cell"
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    assert "STOPPED: 96_slow" in stderr and "same command again" in stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["results"][0]["status"] == "interrupted"
    assert (out / "notebooks" / "96_slow.interrupted.ipynb").exists() and not running.exists()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]


def test_a_stop_between_two_notebooks_still_writes_the_summary(tmp_path, monkeypatch):
    first = _notebook(tmp_path / "01_first.ipynb", "pass")
    second = _notebook(tmp_path / "02_second.ipynb", "pass")
    out = tmp_path / "out"

    def print_then_stop(*args, **kwargs):
        # Ctrl-C lands after 01 finished, while the run announces 02 (outside any notebook)
        if args and str(args[0]).startswith("[2/2]"):
            raise KeyboardInterrupt
    monkeypatch.setattr(runner, "print", print_then_stop, raising=False)
    with pytest.raises(runner.RunInterrupted) as stopped:
        runner.run_notebooks([str(first), str(second)], out=out)
    assert [r.status for r in stopped.value.results] == ["ok", "skipped"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert {e["notebook"]: e["status"] for e in summary["results"]} == {"01_first": "ok", "02_second": "skipped"}
    assert (out / "notebooks" / "01_first.ipynb").exists()


def test_parameters_are_injected(tmp_path):
    nb = _notebook(tmp_path / "98_ok.ipynb", "assert answer == 2 and profile == 'tiny'")
    results = runner.run_notebooks([str(nb)], out=tmp_path / "out", parameters={"answer": 2}, quiet=True)
    assert [r.status for r in results] == ["ok"]
    assert results[0].parameters["answer"] == 2


def test_unknown_parameter_is_refused(tmp_path, capsys):
    nb = _notebook(tmp_path / "97.ipynb", "pass")
    assert cli.main(["run", str(nb), "-p", "ansewr", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ansewr" in err and "did you mean 'answer'" in err


def test_later_notebooks_are_skipped_after_a_failure(tmp_path):
    bad = _notebook(tmp_path / "01_bad.ipynb", "raise RuntimeError('boom')")
    good = _notebook(tmp_path / "02_good.ipynb", "pass")
    results = runner.run_notebooks([str(bad), str(good)], out=tmp_path / "o", quiet=True)
    assert [r.status for r in results] == ["failed", "skipped"]
    assert "boom" in results[0].error
    assert "01_bad" in runner.format_summary(results)


def test_resolve_notebooks_by_prefix():
    assert runner.resolve_notebooks(["01"])[0].stem == "01_text_to_image"
    with pytest.raises(ValueError, match="known"):
        runner.resolve_notebooks(["7"])


def test_cli_values_are_parsed_safely():
    assert cli._parse_value("8") == 8
    assert cli._parse_value("[1, 2]") == [1, 2]
    assert cli._parse_value("!!python/object/apply:os.system ['true']") == \
        "!!python/object/apply:os.system ['true']"


def test_train_command_refuses_bad_settings(tmp_path, capsys):
    code = cli.main(["train", "--dataset", str(tmp_path), "--run", str(tmp_path / "r"), "--profile", "tiny",
                     "-s", "rank", "0"])
    assert code == 2 and "rank=0" in capsys.readouterr().err
    code = cli.main(["train", "--dataset", str(tmp_path / "none"), "--run", str(tmp_path / "r"),
                     "--profile", "tiny"])
    assert code == 2 and "build the training set" in capsys.readouterr().err


# --- the other commands ----------------------------------------------------------------------
def test_env_command_reports_the_machine_and_the_restart_check(capsys):
    import platform

    import torch

    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert platform.python_version() in out and torch.__version__ in out
    assert "No restart needed" in out


def test_fetch_for_kolors_offline_names_the_missing_files_and_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["fetch", "--profile", "kolors", "--cache", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.safetensors" in err and "kolors-course fetch" in err
    assert "offline" in err and "profile='tiny'" in err
    assert not any((tmp_path / "w").rglob("*.safetensors")), "nothing half-downloaded is left"


def test_fetch_for_tiny_writes_files_that_load(tmp_path, capsys):
    from kolors_course.core.profiles import choose_profile
    from kolors_course.models.loading import load_pipeline

    assert cli.main(["fetch", "--profile", "tiny", "--cache", str(tmp_path / "t")]) == 0
    assert "tiny weights ready" in capsys.readouterr().out
    pipe = load_pipeline(choose_profile("tiny", cache_dir=str(tmp_path / "t")), download=False)
    assert pipe.model_path("sdxl_unet").is_relative_to(tmp_path / "t")


def test_run_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    import os

    for name in ("KOLORS_COURSE_HEADLESS", "KOLORS_COURSE_HOME", "MPLBACKEND"):   # set by conftest
        monkeypatch.delenv(name, raising=False)
    nb = _notebook(tmp_path / "96_env.ipynb", "import os\nassert os.environ['KOLORS_COURSE_HEADLESS'] == '1'")
    before = dict(os.environ)
    results = runner.run_notebooks([str(nb)], out=tmp_path / "out", quiet=True)
    assert [r.status for r in results] == ["ok"], results[0].error
    assert dict(os.environ) == before


def test_executed_notebooks_keep_their_figures(tmp_path, monkeypatch):
    """A headless run embeds the figures a learner would see: a kit image grid ending in `;` as the
    notebooks' cells do.  With matplotlib's Agg backend inherited by the kernel (as conftest sets it,
    and as the runner itself once did) the executed copies held no picture at all."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    body = ("from PIL import Image\nimport kolors_course as kc\n"
            "kc.show_grid([('red', Image.new('RGB', (8, 8), 'red'))], title='one');")
    nb = _notebook(tmp_path / "95_figure.ipynb", body)
    results = runner.run_notebooks([str(nb)], out=tmp_path / "out", quiet=True)
    assert [r.status for r in results] == ["ok"], results[0].error
    done = nbformat.read(tmp_path / "out" / "notebooks" / "95_figure.ipynb", as_version=4)
    images = [o for c in done.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 1, [c.get("outputs") for c in done.cells]
    assert os.environ["MPLBACKEND"] == "Agg"                  # put back after the run
