"""``safejax <command> [--config FILE] [key=value ...]``

Commands:
  demo                     the whole pipeline on the built-in task (CPU, minutes)
  sft | rm | cm            supervised fine-tuning, reward model, cost model
  ppo-lag | ppo | ppo-reward-shaping
                           the RL stage (Safe RLHF, and its two baselines)
  grpo-lag | grpo          critic-free RL: GRPO-Lagrangian, and GRPO without the constraint
  dpo                      offline preference optimisation: dpo.loss = dpo | safe_dpo | bfpo
  eval                     score / prefs / arena / elo
  export                   HF-format folder from a stage's checkpoint
Every training command reads a YAML config and then ``key=value`` overrides (dotted keys);
``--print-config`` shows every key with its value and exits.  Wherever a model folder is expected, a
stage's ``out_dir`` works too (its ``hf/`` folder is used).

Rerunning a training command with the same ``out_dir`` resumes from its newest complete checkpoint.
Exit codes: 0 done; 2 bad input, config, checkpoint, a NaN/Inf, an I/O error (full disk, read-only,
permissions) or an out_dir in use by another command (one line ``safejax <cmd>: error: ...``
on stderr, no traceback); 143 stopped by SIGTERM after saving a checkpoint (rerun to resume);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
from typing import Any

import yaml

from safejax import __version__, reference_flags
from safejax.errors import SafejaxError
from safejax.runlock import release_all
from safejax.summary import remove_if_empty, result_line


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _offline_defaults() -> None:
    # nothing is fetched at run time unless a user points a spec at the hub and enables network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' import-time advice ("PyTorch was not found ...") is noise here: safejax never uses torch
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


CONFIG_DOCS = ("Config keys: `safejax %(cmd)s --print-config` lists every key with its value; the annotated "
               "examples are experiments/configs/ (full scale) and experiments/configs/tiny/ (CPU), and each "
               "key is documented in the config dataclass (%(where)s).  The reference's flags "
               "(--actor_model_name_or_path ...) are accepted where their meaning is the same: see the README, "
               "'Coming from safe-rlhf'.")
_CONFIG_HOME = {"sft": "safejax/train/sft.py: SFTConfig", "rm": "safejax/train/score_model.py: ScoreModelConfig",
                "cm": "safejax/train/score_model.py: ScoreModelConfig", "eval": "safejax/evaluate/configs.py",
                "ppo-lag": "safejax/train/ppo_config.py: PPOConfig", "ppo": "safejax/train/ppo_config.py: PPOConfig",
                "ppo-reward-shaping": "safejax/train/ppo_config.py: PPOConfig",
                "grpo-lag": "safejax/train/grpo.py: GRPOConfig", "grpo": "safejax/train/grpo.py: GRPOConfig",
                "dpo": "safejax/train/dpo.py: DPOConfig"}
EVAL_HELP = {
    "score": "each policy answers a prompt set; reward and cost models score the answers (means, harmless ratio)",
    "prefs": "RM / CM accuracy on a preference split (the paper's Table 1)",
    "arena": "a red and a blue policy answer the same prompts; blue's win rate by safety",
    "elo": "pairwise judgements among policies; Bradley-Terry Elo on helpfulness and harmlessness",
}


def _config_epilog(cmd: str) -> str:
    return CONFIG_DOCS % {"cmd": cmd, "where": _CONFIG_HOME[cmd]}


def _stage_parser(name: str, help_text: str, sub) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=_config_epilog(name))
    p.add_argument("--config", "-c", default=None, help="YAML config file (e.g. experiments/configs/tiny/*.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the full config (YAML) and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5 train.epochs=2")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safejax", description="Safe RLHF in JAX",
                                 epilog="Run `safejax COMMAND --help` for a command's options and where its config "
                                        "keys are documented.")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"safejax {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole Safe RLHF pipeline on the built-in task (CPU, minutes)")
    demo.add_argument("--out", default="safejax-demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="drives task generation and training")
    demo.add_argument("--lora", action="store_true",
                      help="also run Safe RLHF with LoRA actor and critics, beside full fine-tuning")
    demo.add_argument("--algorithms", default="",
                      help="comma-separated methods added to the report after the default stages, from the same "
                           "SFT policy: dpo, safe_dpo, bfpo, grpo_lag, grpo (see safejax/demo_algorithms.py)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    _stage_parser("sft", "supervised fine-tuning", sub)
    _stage_parser("rm", "train the reward model (helpfulness)", sub)
    _stage_parser("cm", "train the cost model (harmlessness)", sub)
    for alg, what in (("ppo-lag", "Safe RLHF: PPO-Lagrangian, maximise reward with the mean cost under a threshold"),
                      ("ppo", "baseline: plain PPO on the reward (with KL penalty and ptx)"),
                      ("ppo-reward-shaping", "baseline: PPO on reward - nu * cost with a fixed nu"),
                      ("grpo-lag", "critic-free GRPO-Lagrangian: group-relative reward and cost advantages, "
                                   "four models"),
                      ("grpo", "critic-free GRPO on the reward (no cost model)")):
        _stage_parser(alg, what, sub)
    _stage_parser("dpo", "offline preference optimisation from an SFT policy: dpo.loss = dpo (helpfulness pairs), "
                         "safe_dpo (SafeDPO-style label transform) or bfpo", sub)
    ev = sub.add_parser("eval", help="evaluate policies and preference models", epilog=_config_epilog("eval"),
                        description="Evaluations:\n" + "\n".join(f"  {k:6s} {v}" for k, v in EVAL_HELP.items()),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("what", choices=tuple(EVAL_HELP), help="which evaluation: " + ", ".join(EVAL_HELP))
    ev.add_argument("--config", "-c", default=None,
                    help="YAML config file (e.g. experiments/configs/eval_score.yaml or experiments/configs/tiny/)")
    ev.add_argument("--print-config", action="store_true", help="print the full config (YAML) and exit")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_prompts=64")
    ex = sub.add_parser("export", help="HF folder from a stage's latest checkpoint")
    ex.add_argument("--run", required=True, help="the stage's out_dir (holds config.json and checkpoints/)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    ex.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the exported weights (bfloat16 halves the size)")
    return ap


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    ap = build_parser()
    try:  # the reference's --flags (safe-rlhf scripts) where their meaning is the same: key=value overrides
        argv, notes = reference_flags.translate(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(str(e).replace(": ", ": error: ", 1), file=sys.stderr)  # "safejax CMD: error: ..."
        return EXIT_ERROR
    args, extra = ap.parse_known_args(argv)
    if extra:  # key=value overrides after --config land here when a positional came first (eval WHAT)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            ap.error("unrecognized arguments: " + " ".join(extra))
    _setup_logging(args.verbose)
    for note in notes:
        logging.getLogger("safejax").info("%s", note)
    if args.command != "export":
        from safejax.distributed import maybe_initialize_distributed

        maybe_initialize_distributed()  # multi-host: a no-op unless the environment describes a slice
    from safejax.config import ConfigError, load_config, to_dict
    from safejax.train.common import Preempted

    fresh_dir = None  # an output folder this command creates: removed again if the command fails leaving it empty
    try:
        if args.command in STAGE_CONFIGS and args.config is None and not args.overrides and not args.print_config:
            raise ConfigError(f"no config given: pass --config FILE (e.g. experiments/configs/tiny/"
                              f"{STAGE_CONFIGS[args.command]}.yaml) and/or key=value overrides; "
                              f"`safejax {args.command} --print-config` lists the keys")
        cfg = _load(args, functools.partial(load_config, validate=not getattr(args, "print_config", False)))
        if getattr(args, "print_config", False):
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        out = args.out if args.command in ("demo", "export") else cfg.out_dir
        fresh_dir = None if os.path.exists(os.path.expanduser(out)) else os.path.expanduser(out)
        result = _run(args, cfg)
        cmd = args.command if args.command != "eval" else f"eval {args.what}"
        print(result_line(cmd, cfg, result, out=out), flush=True)
        fresh_dir = None
        return 0
    except Preempted as e:
        print(f"safejax {args.command}: stopped: {_one_line(e)}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (SafejaxError, OSError) as e:  # bad input or the world (disk, lock): one line; anything else is a bug
        if args.verbose:
            traceback.print_exc()
        print(f"safejax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"safejax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        release_all()  # the run-directory locks this command took
        if fresh_dir is not None:
            remove_if_empty(fresh_dir)


STAGE_CONFIGS = {"sft": "sft", "rm": "rm", "cm": "cm", "ppo-lag": "ppo_lag", "ppo": "ppo",
                 "ppo-reward-shaping": "ppo_reward_shaping", "grpo-lag": "grpo_lag", "grpo": "grpo",
                 "dpo": "dpo"}  # command -> its example config's file name


def _load(args, load_config) -> Any:
    """The command's config (``None`` for export)."""
    if args.command == "demo":
        from safejax.demo import DemoConfig

        return load_config(DemoConfig, None, list(args.overrides) + (["lora=true"] if args.lora else []))
    if args.command == "sft":
        from safejax.train.sft import SFTConfig

        return load_config(SFTConfig, args.config, args.overrides)
    if args.command in ("rm", "cm"):
        from safejax.train.score_model import ScoreModelConfig

        return load_config(ScoreModelConfig, args.config, args.overrides)
    if args.command in ("ppo-lag", "ppo", "ppo-reward-shaping"):
        from safejax.train.ppo import PPOConfig

        return load_config(PPOConfig, args.config, list(args.overrides) + [f"algorithm={args.command}"])
    if args.command in ("grpo-lag", "grpo"):
        from safejax.train.grpo import GRPOConfig

        return load_config(GRPOConfig, args.config, list(args.overrides) + [f"algorithm={args.command}"])
    if args.command == "dpo":
        from safejax.train.dpo import DPOConfig

        return load_config(DPOConfig, args.config, args.overrides)
    if args.command == "eval":
        from safejax.evaluate.cli import CONFIGS

        return load_config(CONFIGS[args.what], args.config, args.overrides)
    return None


def _run(args, cfg) -> Any:
    """Run the command on its loaded config; returns what :func:`result_line` summarizes."""
    if args.command == "demo":
        from safejax.demo import run_demo
        from safejax.demo_algorithms import parse_algorithms

        return run_demo(cfg, out_dir=args.out, seed=args.seed, algorithms=parse_algorithms(args.algorithms))
    if args.command == "sft":
        from safejax.train.sft import run_sft

        return run_sft(cfg)
    if args.command in ("rm", "cm"):
        from safejax.train.score_model import run_score_model

        return run_score_model(cfg, "reward" if args.command == "rm" else "cost")
    if args.command in ("ppo-lag", "ppo", "ppo-reward-shaping"):
        from safejax.train.ppo_loop import run_ppo

        return run_ppo(cfg)
    if args.command in ("grpo-lag", "grpo"):
        from safejax.train.grpo_loop import run_grpo

        return run_grpo(cfg)
    if args.command == "dpo":
        from safejax.train.dpo import run_dpo

        return run_dpo(cfg)
    if args.command == "eval":
        from safejax.evaluate.cli import run_eval_config

        return run_eval_config(args.what, cfg)
    from safejax.train.export import export_run

    return export_run(args.run, args.out, step=args.step, dtype=args.dtype)


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
