"""Running the course notebooks headless with papermill."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kolors_course.core.paths import project_path, project_root, relative_to_root
from kolors_course.core.state import environ, environ_default
from kolors_course.core.steps import gallery_file

#: matplotlib's backend in a Jupyter kernel (the matplotlib-inline package, which ipykernel needs)
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


@dataclass
class NotebookResult:
    notebook: str
    status: str                 # "ok", "failed", "interrupted", "skipped"
    seconds: float = 0.0
    output: str = ""
    cell: int | None = None
    error: str = ""
    parameters: dict = field(default_factory=dict)

    @property
    def failure(self) -> str:
        """Where and why it failed, as "cell In [n]: error": the label the executed copy shows
        (papermill's injected-parameters cell counts too), so nobody counts cells."""
        return f"cell In [{self.cell}]: {self.error}" if self.cell is not None else self.error


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during ``run_notebooks``: the summary is written first; ``results`` holds it."""

    def __init__(self, results: list[NotebookResult]):
        self.results = results
        #: the notebook that was running, or None: stopped between two notebooks
        self.stopped = next((r for r in results if r.status == "interrupted"), None)
        ran = [r.notebook for r in results if r.status == "ok"]
        super().__init__(f"{self.stopped.notebook} was stopped after {self.stopped.seconds:.0f} s" if self.stopped
                         else f"stopped between notebooks, after {ran[-1] if ran else 'none'} finished")


class NotebookFailed(RuntimeError):
    def __init__(self, results: list[NotebookResult]):
        self.results = results
        bad = next(r for r in results if r.status == "failed")
        super().__init__(f"{bad.notebook} failed in {bad.failure}")


def course_notebooks() -> list[Path]:
    """The numbered notebooks, in order."""
    nbs = sorted(project_path("notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not nbs:
        raise FileNotFoundError(f"no numbered notebooks in {project_path('notebooks')}")
    return nbs


def resolve_notebooks(names: list[str] | None) -> list[Path]:
    """Notebook paths from names such as ``01``, ``01_text_to_image`` or a path."""
    all_nbs = course_notebooks()
    if not names:
        return all_nbs
    out = []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb" and p.exists():
            out.append(p.resolve())
            continue
        hits = [nb for nb in all_nbs if nb.stem == name or nb.stem.startswith(name)]
        if len(hits) != 1:
            known = ", ".join(nb.stem for nb in all_nbs)
            raise ValueError(f"notebook {name!r} matches {len(hits)} notebooks; known: {known}")
        out.append(hits[0])
    return out


def declared_parameters(nb_path: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(nb_path))


def kernel_manager_class(log_file: str | os.PathLike | None = None):
    """The kernel manager the runner starts kernels with: IPC transport where it exists, and the
    kernel's own stderr in ``log_file`` when one is given.

    The kernel and the runner are on the same machine, so they talk over Unix
    sockets (in Jupyter's runtime folder, readable by this user only) instead of
    TCP ports on localhost; ipykernel then has no reason to print, for every
    notebook, that it is "running over TCP without encryption".  Windows has no
    IPC transport in ZeroMQ and keeps TCP (and the message).

    What a cell writes to ``sys.stderr`` lands in the notebook either way; ``log_file`` takes what the
    kernel process itself writes to its stderr (ipykernel's log, for instance the traceback it logs
    when a stop interrupts a cell, which would otherwise land in the middle of the run's summary).
    The file is removed again when the kernel left nothing in it."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            if log_file is not None:
                Path(log_file).parent.mkdir(parents=True, exist_ok=True)
                self._kernel_log = open(log_file, "wb")        # this run's, not an earlier one's
                kw["stderr"] = self._kernel_log
            await super()._async_launch_kernel(kernel_cmd, **kw)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            log = getattr(self, "_kernel_log", None)
            if not restart and log is not None:
                log.close()
                self._kernel_log = None
                if os.path.getsize(log.name) == 0:
                    os.remove(log.name)

    if os.name == "nt":
        return LoggedKernelManager

    class IPCKernelManager(LoggedKernelManager):
        @default("transport")
        def _default_transport(self):
            return "ipc"

        @default("ip")
        def _default_ip(self):
            # the sockets' path prefix; jupyter_client's default is relative ("kernel-ipc"),
            # which put the sockets in the notebook's folder: use a private folder instead
            import tempfile

            self._ipc_dir = tempfile.mkdtemp(prefix="kolors-course-ipc-")
            return os.path.join(self._ipc_dir, "kernel")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart and getattr(self, "_ipc_dir", None):
                import shutil

                shutil.rmtree(self._ipc_dir, ignore_errors=True)

    return IPCKernelManager


def run_notebooks(notebooks: list[str] | None = None, out: str | os.PathLike = "runs/course",
                  profile: str = "tiny", parameters: dict | None = None, kernel_name: str = "python3",
                  cell_timeout: int = 1800, log_output: bool = False, stop_on_error: bool = True,
                  quiet: bool = False) -> list[NotebookResult]:
    """Execute notebooks in order into ``out``; returns one result per notebook.

    Every notebook gets ``profile`` and ``out_dir``; other parameters go only to
    the notebooks that declare them, and a parameter no notebook declares is an
    error (a typo would otherwise be silently ignored).
    """
    paths = resolve_notebooks(notebooks)
    out_dir = project_path(out)
    (out_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters or {})
    declared = {p: declared_parameters(p) for p in paths}
    unknown = [k for k in parameters if not any(k in d for d in declared.values())]
    if unknown:
        import difflib

        known = sorted({k for d in declared.values() for k in d} - {"profile", "out_dir"})
        hints = [f"{k!r}: did you mean {', '.join(map(repr, close))}?" for k in unknown
                 if (close := difflib.get_close_matches(k, known, n=2))]
        raise ValueError(f"parameter(s) {unknown} are declared by none of "
                         f"{[p.stem for p in paths]}; check the spelling"
                         + (" (" + "; ".join(hints) + ")" if hints else "")
                         + f". Their parameters: {', '.join(known) or 'none'}")
    results: list[NotebookResult] = []
    # the kernels inherit these: headless bars, the project root (a learner's own wins), and
    # Jupyter's inline plot backend, so the executed notebooks keep their figures as a learner's
    # would (a non-interactive backend such as Agg, set for tests or servers, left them with
    # none); all put back when the run ends
    # SIGTERM is Ctrl-C for the whole loop, so a stop between two notebooks is caught too
    with environ(KOLORS_COURSE_HEADLESS="1", MPLBACKEND=INLINE_BACKEND), \
            environ_default(KOLORS_COURSE_HOME=str(project_root())), _sigterm_as_interrupt():
        try:
            _run_each(paths, declared, parameters, profile, out_dir, kernel_name, cell_timeout, log_output,
                      stop_on_error, quiet, results)
        except RunInterrupted:
            write_summary(results, out_dir, profile)
            raise
        except KeyboardInterrupt:
            # stopped between notebooks (moving a copy into place, printing): what ran is kept
            done = {r.notebook for r in results}
            results += [NotebookResult(p.stem, "skipped", error="not run: the run was stopped")
                        for p in paths if p.stem not in done]
            write_summary(results, out_dir, profile)
            raise RunInterrupted(results) from None
    write_summary(results, out_dir, profile)
    return results


def _run_each(paths, declared, parameters, profile, out_dir, kernel_name, cell_timeout, log_output,
              stop_on_error, quiet, results) -> None:
    """``run_notebooks``' loop: executes each notebook, appending its result to ``results``."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    for i, nb in enumerate(paths):
        params = {"profile": profile, "out_dir": str(out_dir)}
        params.update({k: v for k, v in parameters.items() if k in declared[nb]})
        target = out_dir / "notebooks" / nb.name
        if not quiet:
            print(f"[{i + 1}/{len(paths)}] {nb.stem} ...", flush=True)
        t0 = time.perf_counter()
        # executed into a working copy: the copy from an earlier run that finished stays in
        # place until this one finishes too; a failed or stopped run keeps its copy beside it
        running = target.with_name(f"{nb.stem}.running.ipynb")
        kernel_log = target.with_name(f"{nb.stem}.kernel.log")     # kept only if the kernel wrote to it
        res = NotebookResult(nb.stem, "ok", output=relative_to_root(target), parameters=params)
        try:
            pm.execute_notebook(str(nb), str(running), parameters=params, kernel_name=kernel_name,
                                cwd=str(nb.parent), progress_bar=False, log_output=log_output,
                                execution_timeout=cell_timeout,
                                kernel_manager_class=kernel_manager_class(kernel_log))
        except PapermillExecutionError as exc:
            # exec_count is the In [n] shown in the executed copy (NotebookResult.failure)
            res.status, res.cell = "failed", exc.exec_count
            line = failing_line(exc)
            res.error = f"{exc.ename}: {exc.evalue}" + (f"  (at `{line[:80]}`)" if line else "")
        except KeyboardInterrupt:
            res.status, res.error = "interrupted", "stopped (Ctrl-C or SIGTERM)"
        except Exception as exc:   # kernel died, timeout, bad notebook
            res.status, res.error = "failed", f"{type(exc).__name__}: {exc}"
        res.seconds = round(time.perf_counter() - t0, 1)
        if res.status == "failed" and kernel_log.exists():
            res.error += f"; the kernel's own messages: {relative_to_root(kernel_log)}"
        kept = _keep_executed_copy(running, target, res.status)
        if kept is not None:
            res.output = relative_to_root(kept)
        results.append(res)
        if not quiet:
            print(f"      {res.status} in {res.seconds:.1f} s" +
                  (f" -- {res.failure}" if res.status == "failed" else ""), flush=True)
        if res.status == "interrupted":
            results += [NotebookResult(rest.stem, "skipped", error=f"not run: {nb.stem} was stopped")
                        for rest in paths[i + 1:]]
            raise RunInterrupted(results)
        if res.status == "failed" and stop_on_error:
            for rest in paths[i + 1:]:
                results.append(NotebookResult(rest.stem, "skipped",
                                              error=f"not run: {nb.stem} failed first"))
            break


def write_summary(results: list[NotebookResult], out_dir: Path, profile: str) -> Path:
    """``out_dir/summary.json``: this run's results, merged into the summary already there
    for the same profile (running ``03`` alone into a course folder updates its entry and keeps
    the other notebooks'); a summary of another profile is replaced."""
    path = out_dir / "summary.json"
    entries: dict[str, dict] = {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("profile") == profile:
            entries = {e["notebook"]: e for e in old.get("results", []) if isinstance(e, dict) and "notebook" in e}
    except (OSError, ValueError, TypeError, AttributeError):
        pass      # none yet, or unreadable: this run's results alone
    finished = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in results:
        if r.status == "skipped" and r.notebook in entries:
            continue      # not run this time: what the last run of it said still holds
        entries[r.notebook] = asdict(r) | {"finished": finished}
    ordered = [entries[k] for k in sorted(entries)]
    data = {"profile": profile, "results": ordered,
            "total_seconds": round(sum(e.get("seconds", 0) for e in ordered), 1)}
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _keep_executed_copy(running: Path, target: Path, status: str) -> Path | None:
    """Moves a run's working copy into place: over ``target`` when the run finished, else beside
    it as ``NAME.failed.ipynb`` / ``NAME.interrupted.ipynb``.  Returns where it went (None: papermill
    wrote nothing, e.g. a notebook that did not open)."""
    if not running.exists():
        return None
    if status == "ok":
        dest = target
        for stale in ("failed", "interrupted"):
            target.with_name(f"{target.stem}.{stale}.ipynb").unlink(missing_ok=True)
    else:
        dest = target.with_name(f"{target.stem}.{status}.ipynb")
    os.replace(running, dest)
    return dest


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failing_line(exc) -> str:
    """The notebook line a ``PapermillExecutionError`` was raised at: the last ``---->`` line of
    the traceback's frames in the cell itself (``Cell In[n]``), not the cell's first line."""
    line = ""
    for frame in getattr(exc, "traceback", None) or []:
        text = _ANSI.sub("", str(frame))
        if "Cell In[" not in text:
            continue
        for row in text.splitlines():
            if row.lstrip().startswith("---->"):
                line = row.split("---->", 1)[1].strip()
                line = re.sub(r"^\d+\s*", "", line)      # the line number IPython prints
    return line


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a ``timeout``, a closed job) stops a run as Ctrl-C does, so the summary still gets
    written; the previous handler is put back.  Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def format_summary(results: list[NotebookResult]) -> str:
    width = max([len(r.notebook) for r in results] + [8])
    lines = [f"{'notebook':<{width}}  {'status':<7}  {'seconds':>7}  detail",
             "-" * (width + 30)]
    for r in results:
        detail = r.output if r.status == "ok" else r.failure
        lines.append(f"{r.notebook:<{width}}  {r.status:<7}  {r.seconds:>7.1f}  {detail[:200]}")
    total = sum(r.seconds for r in results)
    ok = sum(r.status == "ok" for r in results)
    lines.append(f"{ok}/{len(results)} notebooks ran, {total:.1f} s in all")
    return "\n".join(lines)


# --- class-wide runs ------------------------------------------------------------------
def load_batch_file(path: str | os.PathLike) -> dict:
    """A batch file (YAML, parsed safely)::

        profile: tiny
        out: runs/class
        notebooks: [02, 03, 04]        # optional, default: all
        sets:
          - name: fox
            parameters: {story: ink_fox, team_name: alice}
          - name: robot-rank8
            parameters: {story: lighthouse_robot, rank: 8}
    """
    import yaml

    p = project_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"batch file {p} not found")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    sets = data.get("sets")
    if not isinstance(sets, list) or not sets:
        raise ValueError(f"{p.name}: 'sets' must be a non-empty list of {{name, parameters}}")
    names = []
    for i, s in enumerate(sets, 1):
        if not isinstance(s, dict) or not str(s.get("name", "")).strip():
            raise ValueError(f"{p.name}: set {i} needs a name")
        name = str(s["name"])
        if any(ch in name for ch in "/\\") or name in (".", ".."):
            raise ValueError(f"{p.name}: set name {name!r} must be a plain folder name")
        if name in names:
            raise ValueError(f"{p.name}: set name {name!r} is used twice")
        names.append(name)
        if not isinstance(s.get("parameters", {}), dict):
            raise ValueError(f"{p.name}: parameters of set {name!r} must be a mapping")
    data.setdefault("profile", "tiny")
    data.setdefault("out", "runs/class")
    data["notebooks"] = [str(n).zfill(2) if isinstance(n, int) else str(n) for n in data.get("notebooks") or []]
    return data


def run_batch(path: str | os.PathLike, quiet: bool = False) -> list[dict]:
    """Run the notebooks once per parameter set; a failed set is reported and the rest go on.
    Writes ``<out>/index.html`` linking every set's gallery."""
    from kolors_course.story.gallery import write_index

    batch = load_batch_file(path)
    out = project_path(batch["out"])
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in batch["sets"]:
        name = str(s["name"])
        if not quiet:
            print(f"== set {name} ==", flush=True)
        try:
            results = run_notebooks(batch["notebooks"] or None, out=out / name, profile=batch["profile"],
                                    parameters=s.get("parameters") or {}, quiet=quiet)
            failed = [r for r in results if r.status == "failed"]
            gallery = gallery_file(out / name)
            entries.append({"name": name, "status": "failed" if failed else "ok",
                            "detail": (f"{failed[0].notebook}, {failed[0].failure}"
                                       if failed else f"{sum(r.seconds for r in results):.0f} s"),
                            "gallery": gallery if gallery.exists() else None})
        except (ValueError, FileNotFoundError) as exc:
            entries.append({"name": name, "status": "failed", "detail": str(exc), "gallery": None})
    write_index(entries, out / "index.html")
    (out / "batch.json").write_text(json.dumps([{**e, "gallery": relative_to_root(e["gallery"])
                                                 if e["gallery"] else None} for e in entries],
                                               indent=2, ensure_ascii=False), encoding="utf-8")
    return entries
