"""The ``kolors-course`` command."""
from __future__ import annotations

import argparse
import sys


def _parse_value(text: str):
    """Parameter values typed on the command line: YAML scalars and lists (safe_load).

    YAML 1.1 reads ``1e-4`` (no dot) as a string; a value that Python reads as a
    number is a number, in every common notation.
    """
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def cmd_run(args) -> int:
    from kolors_course.runner import RunInterrupted, format_summary, run_notebooks

    params = {k: _parse_value(v) for k, v in (args.parameter or [])}
    try:
        results = run_notebooks(args.notebooks or None, out=args.out, profile=args.profile,
                                parameters=params, log_output=args.log_output,
                                cell_timeout=args.cell_timeout)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print()
        print(format_summary(stop.results))
        r = stop.stopped
        where = (f"{r.notebook} after {r.seconds:.0f} s; what it had run so far is in {r.output}"
                 f" (an earlier finished copy, if any, is kept)" if r else f"{stop} (its copy is kept)")
        print(f"\nSTOPPED: {where}.\nRun the same command again to redo it: "
              "notebook 03's LoRA training continues from its last checkpoint, and work that finished "
              "(data set, finished LoRA runs) is reused.", file=sys.stderr)
        return 130
    print()
    print(format_summary(results))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        r = failed[0]
        print(f"\nFAILED: {r.notebook}, {r.failure}\n"
              f"Open {r.output} to see the failing cell.", file=sys.stderr)
        return 1
    return 0


def cmd_batch(args) -> int:
    from kolors_course.runner import RunInterrupted, run_batch

    try:
        entries = run_batch(args.file)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as stop:
        print(f"\nSTOPPED: {stop}. The sets that finished are kept; run the same command again to "
              "redo the rest (finished LoRA runs and data sets are reused).", file=sys.stderr)
        return 130
    print()
    width = max(len(e["name"]) for e in entries)
    for e in entries:
        print(f"{e['name']:<{width}}  {e['status']:<6}  {e['detail']}")
    failed = [e for e in entries if e["status"] != "ok"]
    print(f"{len(entries) - len(failed)}/{len(entries)} sets ran; index page written next to the sets")
    return 1 if failed else 0


def cmd_train(args) -> int:
    from kolors_course.data.training_set import DatasetError
    from kolors_course.lora.config import TrainConfig, TrainingError
    from kolors_course.lora.train import train_lora
    from kolors_course.core.profiles import choose_profile

    prof = choose_profile(args.profile)
    try:
        cfg = TrainConfig.for_profile(prof, **{k: _parse_value(v) for k, v in (args.setting or [])})
        resume = {"auto": "auto", "yes": True, "no": False}[args.resume]
        result = train_lora(prof, args.dataset, args.run, cfg, resume=resume, overwrite=args.overwrite)
    except (TrainingError, DatasetError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.files:
        print(result.summary())
    return 0


def cmd_env(args) -> int:
    from kolors_course.setup.envinfo import needs_restart, print_environment_report

    print_environment_report()
    needs_restart()
    return 0


def cmd_fetch(args) -> int:
    from kolors_course.models.loading import MissingWeightsError, ensure_weights
    from kolors_course.core.profiles import choose_profile

    prof = choose_profile(args.profile, **({"cache_dir": args.cache} if args.cache else {}))
    try:
        files = ensure_weights(prof, download=True)
        if args.controlnet:
            from kolors_course.models.loading import ensure_controlnet

            print(f"ControlNet-Union ready: {ensure_controlnet(prof, download=True)}")
    except MissingWeightsError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{prof.name} weights ready under {prof.cache_path}: {files.unet.name}, "
          f"{files.text_encoder.name}/, {files.vae.name}")
    return 0


def cmd_build_tiny(args) -> int:
    """Train the tiny profile's UNet and VAE on the synthetic world (kolors_course.world.build)."""
    from kolors_course.world.build import STAGES, build_tiny, parse_recipe_options

    try:
        recipe = parse_recipe_options(args.unet_option)
        vae_recipe = parse_recipe_options(args.vae_option, "--vae-option")
    except ValueError as e:
        print(f"kolors-course build-tiny: {e}", file=sys.stderr)
        return 2
    # what the manifest records as the command that made the files: this one, as typed
    command = " ".join(["kolors-course build-tiny", *args.argv[1:]]) if getattr(args, "argv", None) else None
    manifest = build_tiny(args.out, seed=args.seed, threads=args.threads, quick=args.quick,
                          log_file=args.log_file, command=command, stages=tuple(args.stage or STAGES),
                          vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                          controlnet_steps=args.controlnet_steps, unet_recipe=recipe, vae_recipe=vae_recipe)
    if manifest is None:
        print(f"stage(s) {', '.join(args.stage)} written under {args.out}; run `--stage finish` when the others are done")
    else:
        print(f"wrote {len(manifest['files'])} files and manifest.json under {args.out} "
              f"in {sum(manifest['seconds'].values()):.0f} s of training")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kolors-course", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run course notebooks headless with papermill")
    r.add_argument("notebooks", nargs="*", help="names such as 01 or 01_text_to_image (default: all)")
    r.add_argument("--profile", default="tiny", choices=["auto", "tiny", "kolors", "kolors-rehearsal"])
    r.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter (repeatable)")
    r.add_argument("--out", default="runs/course", help="output folder (default runs/course)")
    r.add_argument("--log-output", action="store_true", help="stream notebook output to this terminal")
    r.add_argument("--cell-timeout", type=int, default=1800, help="seconds per cell before giving up")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("batch", help="run the notebooks for several parameter sets (a class)")
    b.add_argument("file", help="a YAML batch file (see README)")
    b.set_defaults(func=cmd_batch)

    t = sub.add_parser("train", help="train a LoRA (also under `accelerate launch -m kolors_course.cli train`)")
    t.add_argument("--dataset", required=True, help="a training set built by notebook 02 (folder with train/)")
    t.add_argument("--run", required=True, help="the run folder (checkpoints, samples, LoRA files)")
    t.add_argument("--profile", default="auto", choices=["auto", "tiny", "kolors", "kolors-rehearsal"])
    t.add_argument("-s", "--setting", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a TrainConfig field, e.g. -s rank 32 -s max_steps 1000 (repeatable)")
    t.add_argument("--resume", default="auto", choices=["auto", "yes", "no"])
    t.add_argument("--overwrite", action="store_true", help="train again over a finished run")
    t.set_defaults(func=cmd_train)

    h = sub.add_parser("rehearsal", add_help=False,
                       help="the kolors profile on this CPU with Kolors-sized random weights (make rehearsal)")
    h.add_argument("args", nargs=argparse.REMAINDER)
    h.set_defaults(func=None)      # main() hands its arguments to kolors_course.models.rehearsal
    s = sub.add_parser("build-scorer", add_help=False,
                       help="train the tiny profile's stand-in aesthetic scorer (a few minutes; see --help)")
    s.set_defaults(func=None)      # main() hands its arguments to kolors_course.story.stand_in_scorer

    e = sub.add_parser("env", help="report the environment and whether a restart is needed")
    e.set_defaults(func=cmd_env)

    f = sub.add_parser("fetch", help="download (kolors) or build (tiny) a profile's model files")
    f.add_argument("--profile", default="kolors", choices=["auto", "tiny", "kolors"])
    f.add_argument("--cache", default=None, help="model cache folder (default: the profile's)")
    f.add_argument("--controlnet", action="store_true",
                   help="also the SDXL ControlNet-Union (promax) file for notebook 05 (about 2.5 GB)")
    f.set_defaults(func=cmd_fetch)

    bt = sub.add_parser("build-tiny", help="train the tiny profile's UNet, VAE and ControlNet-Union from scratch "
                                           "(about 73 minutes on 2 cores with --threads 2, the stages one after "
                                           "the other; about twice that with the default --threads 1)")
    bt.add_argument("--out", required=True, help="output folder (the shipped one: kolors_course/world/weights)")
    bt.add_argument("--quick", action="store_true", help="a few steps only: checks the path, not for use")
    bt.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    bt.add_argument("--seed", type=int, default=0)
    bt.add_argument("--log-file", default=None, help="also write the training log here")
    bt.add_argument("--stage", action="append", choices=["vae", "unet", "controlnet", "finish"],
                    help="run only this stage (repeatable); `vae` and `unet` can run side by side as two "
                         "processes with --threads 1 each, `controlnet` after `unet`, then `finish` writes "
                         "the manifest (default: all)")
    bt.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default: the shipped build's)")
    bt.add_argument("--unet-steps", type=int, default=None, help="UNet training steps (default: the shipped build's)")
    bt.add_argument("--controlnet-steps", type=int, default=None,
                    help="ControlNet-Union training steps (default: the shipped build's)")
    bt.add_argument("--unet-option", action="append", default=[], metavar="KEY=VALUE",
                    help="override one entry of the UNet's training recipe (kolors_course.world.build.UNET_RECIPE, "
                         "fields of UNetConfig), e.g. x0_weight_cap=10, or =none to switch it off (repeatable)")
    bt.add_argument("--vae-option", action="append", default=[], metavar="KEY=VALUE",
                    help="override one entry of the VAE's training recipe (kolors_course.world.build.VAE_RECIPE, "
                         "fields of VAEConfig), e.g. edge_weight=0 (repeatable)")
    bt.set_defaults(func=cmd_build_tiny)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["rehearsal"]:     # its own options (--out, --cache, --weights-only, notebooks)
        from kolors_course.models.rehearsal import main as rehearsal_main

        return rehearsal_main(argv[1:])
    if argv[:1] == ["build-scorer"]:  # its own options (--out, --seed, --steps, --threads)
        from kolors_course.story.stand_in_scorer import main as scorer_main

        return scorer_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
