"""``safejax <command> [--config FILE] [key=value ...]``

Commands:
  demo                     the whole pipeline on the built-in task (CPU, minutes)
  sft | rm | cm            supervised fine-tuning, reward model, cost model
  ppo-lag | ppo | ppo-reward-shaping
                           the RL stage (Safe RLHF, and its two baselines)
  eval                     score / prefs / arena / elo
  export                   HF-format folder from a stage's checkpoint
Every training command reads a YAML config and then ``key=value`` overrides (dotted keys).

Rerunning a training command with the same ``out_dir`` resumes from its newest complete checkpoint.
Exit codes: 0 done; 2 bad input, config, checkpoint, a NaN/Inf, an I/O error (full disk, read-only,
permissions) or an out_dir in use by another command (one line ``safejax <cmd>: error: ...``
on stderr, no traceback); 143 stopped by SIGTERM after saving a checkpoint (rerun to resume);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from safejax.runlock import release_all


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _offline_defaults() -> None:
    # nothing is fetched at run time unless a user points a spec at the hub and enables network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stage_parser(name: str, help_text: str, sub) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5 train.epochs=2")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safejax", description="Safe RLHF in JAX")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole Safe RLHF pipeline on the built-in task (CPU, minutes)")
    demo.add_argument("--out", default="safejax-demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="drives task generation and training")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    _stage_parser("sft", "supervised fine-tuning", sub)
    _stage_parser("rm", "train the reward model (helpfulness)", sub)
    _stage_parser("cm", "train the cost model (harmlessness)", sub)
    for alg in ("ppo-lag", "ppo", "ppo-reward-shaping"):
        _stage_parser(alg, f"RL stage with algorithm {alg}", sub)
    ev = sub.add_parser("eval", help="evaluate policies and preference models")
    ev.add_argument("what", choices=("score", "prefs", "arena", "elo"))
    ev.add_argument("--config", "-c", default=None)
    ev.add_argument("overrides", nargs="*")
    ex = sub.add_parser("export", help="HF folder from a stage's latest checkpoint")
    ex.add_argument("--run", required=True, help="the stage's out_dir (holds config.json and checkpoints/)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--step", type=int, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:  # key=value overrides after --config land here when a positional came first (eval WHAT)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            ap.error("unrecognized arguments: " + " ".join(extra))
    _setup_logging(args.verbose)
    if args.command != "export":
        from safejax.parallel import maybe_initialize_distributed

        maybe_initialize_distributed()  # multi-host: a no-op unless the environment describes a slice
    from safejax.config import ConfigError, load_config
    from safejax.train.common import Preempted

    try:
        if args.command == "demo":
            from safejax.demo import DemoConfig, run_demo

            cfg = load_config(DemoConfig, None, args.overrides)
            run_demo(cfg, out_dir=args.out, seed=args.seed)
        elif args.command == "sft":
            from safejax.train.sft import SFTConfig, run_sft

            run_sft(load_config(SFTConfig, args.config, args.overrides))
        elif args.command in ("rm", "cm"):
            from safejax.train.score_model import ScoreModelConfig, run_score_model

            run_score_model(load_config(ScoreModelConfig, args.config, args.overrides),
                            "reward" if args.command == "rm" else "cost")
        elif args.command in ("ppo-lag", "ppo", "ppo-reward-shaping"):
            from safejax.train.ppo import PPOConfig
            from safejax.train.ppo_loop import run_ppo

            cfg = load_config(PPOConfig, args.config, list(args.overrides) + [f"algorithm={args.command}"])
            run_ppo(cfg)
        elif args.command == "eval":
            from safejax.evaluate.cli import run_eval

            run_eval(args.what, args.config, args.overrides)
        elif args.command == "export":
            from safejax.train.export import export_run

            export_run(args.run, args.out, step=args.step)
        return 0
    except Preempted as e:
        print(f"safejax {args.command}: stopped: {_one_line(e)}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (ConfigError, ValueError, OSError, FloatingPointError) as e:
        print(f"safejax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"safejax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        release_all()  # the run-directory locks this command took


EXIT_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, OSError) and not text:
        text = repr(e)
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and e.filename \
            and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
