"""`pgolf launch`: run a sky/*.yaml on the cloud through SkyPilot's Python API (or just print it).

    pgolf launch sky/record.yaml --seed 1337 --image ghcr.io/you/pgolf:TAG
    pgolf launch --seeds 1337 42 2025          # one cluster: first seed launches, the rest `exec`
    pgolf launch --dry-run                     # resolved task + equivalent `sky` command, offline

Record tasks (those declaring CODE_SHA256) run the generated train_gpt.py: it is written to
ship/train_gpt.py in the workdir first (dry run included), shipped with the workdir, and its sha256
is passed to the node, which refuses any other file.

SkyPilot is imported inside the handler (and only for checks/launches), never at module level.
"""

from __future__ import annotations

import argparse
import getpass

from pgolf import config as cfgmod


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("launch", help="launch a sky/*.yaml task on the cloud (SkyPilot)",
                       description="Build a SkyPilot task from a sky/*.yaml with overrides; "
                                   "--dry-run prints it and the equivalent `sky` command offline. Record "
                                   "tasks first generate ship/train_gpt.py (the file a submission ships), "
                                   "which the node runs.")
    p.add_argument("task", nargs="?", default="sky/record.yaml", help="task YAML (default: %(default)s)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="one seed (default: the YAML's SEED)")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="several seeds, one after another on one cluster (launch, then exec)")
    p.add_argument("--cluster", default=None, help="cluster or managed-job name (default: pgolf-$USER-s<seed>)")
    p.add_argument("--run-id", default=None, help="RUN_ID (default: <preset>-s<seed>-<UTC>-<hex>; one seed only)")
    p.add_argument("--preset", default=None, choices=list(cfgmod.PRESETS), help="PRESET env of the task")
    p.add_argument("--image", default=None, help="prebuilt image (tag or @sha256 digest), passed as --image-id")
    p.add_argument("--image-digest", default=None, help="IMAGE_DIGEST to record (default: from --image)")
    p.add_argument("--results-uri", default=None, help="RESULTS_URI (default: $RESULTS_URI)")
    p.add_argument("--data-uri", default=None, help="DATA_URI of staged shards (default: $DATA_URI)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="any task env or config knob, e.g. --env TTT_LR=1e-4 (repeatable)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME[=VALUE]",
                   help="secret value; declared secrets are otherwise read from your environment")
    p.add_argument("--idle-minutes", type=int, default=10, help="autostop after N idle minutes (%(default)s)")
    p.add_argument("--no-down", action="store_true", help="stop instead of tearing down when idle")
    p.add_argument("--retry-until-up", action="store_true", help="keep retrying until capacity is found")
    p.add_argument("--num-nodes", type=int, default=None, help="override num_nodes (sky/long.yaml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exec", dest="exec_only", action="store_true",
                      help="run on the existing cluster without setup (sky exec)")
    mode.add_argument("--managed", action="store_true", help="submit as a managed job (sky jobs launch)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved task and command; no network")
    p.add_argument("--no-check", action="store_true", help="skip the offline SkyPilot checks")
    p.set_defaults(func=_launch)


def _seeds(args: argparse.Namespace, yaml_envs: dict) -> list[int]:
    if args.seeds:
        return list(args.seeds)
    if args.seed is not None:
        return [args.seed]
    return [int(yaml_envs.get("SEED", 1337))]


def _base_envs(args: argparse.Namespace, yaml_envs: dict) -> dict[str, str]:
    from pgolf.cloud.launch import parse_env_pairs

    local = cfgmod.env_overrides()  # config fields set in your shell (upper-case names)
    envs: dict[str, str] = {}
    for name, flag in (("RESULTS_URI", args.results_uri), ("DATA_URI", args.data_uri)):
        value = flag if flag is not None else local.get(name.lower())
        if value and name in yaml_envs:
            envs[name] = value
    if args.preset:
        envs["PRESET"] = args.preset
        # the YAML's data envs override the file's embedded defaults: a preset that trains on another
        # data variant (frontier: caseops8192) gets its own variant, shard folder and tokenizer
        data = cfgmod.resolve(args.preset, env={}).data
        if "VARIANT" in yaml_envs and data.data_variant != str(yaml_envs["VARIANT"]):
            for name, value in (("VARIANT", data.data_variant), ("DATA_PATH", data.data_path),
                                ("TOKENIZER_PATH", data.tokenizer_path)):
                if name in yaml_envs:
                    envs[name] = value
    envs.update(parse_env_pairs(args.env))
    return envs


def _run_id(preset: str, seed: int) -> str:
    from pgolf.runid import make_run_id

    return make_run_id(cfgmod.resolve(preset, {"seed": seed}, env={}))


def _launch(args: argparse.Namespace) -> int:
    from pgolf.cloud import launch as lib

    task = lib.read_task_yaml(args.task)
    yaml_envs = dict(task.get("envs") or {})
    seeds = _seeds(args, yaml_envs)
    if args.run_id and len(seeds) > 1:
        raise lib.LaunchError("--run-id names one run; drop it with --seeds (each seed gets its own)")
    base = _base_envs(args, yaml_envs)
    # `--secret NAME=VALUE` gives the value; `--secret NAME` means "read it from my environment".
    secrets = {name: value for name, _, value in (pair.partition("=") for pair in args.secret)}
    cluster = args.cluster or lib.cluster_name(getpass.getuser(), seeds[0])
    preset = base.get("PRESET") or str(yaml_envs.get("PRESET") or "seed")
    # One train_gpt.py for every seed (the seed is not embedded): generated here, run on the node.
    shipped = lib.ship_code(args.task, base) if lib.ships_code(task) else None

    plans = []
    for i, seed in enumerate(seeds):
        envs = dict(base)
        if "SEED" in yaml_envs:
            envs["SEED"] = str(seed)
        if "RUN_ID" in yaml_envs:
            envs["RUN_ID"] = args.run_id or envs.get("RUN_ID") or _run_id(preset, seed)
        mode = "jobs" if args.managed else ("exec" if args.exec_only or i > 0 else "launch")
        name = f"{cluster}-s{seed}" if args.managed and len(seeds) > 1 else cluster
        plans.append(lib.plan_launch(
            args.task, mode=mode, cluster=name, envs=envs, secrets=secrets, image=args.image,
            image_digest=args.image_digest, idle_minutes=args.idle_minutes, down=not args.no_down,
            retry_until_up=args.retry_until_up, num_nodes=args.num_nodes, code=shipped))

    checked = "not checked (--no-check)"
    if not args.no_check:
        try:
            checked = lib.check_plan(plans[0])
        except ImportError:
            checked = "not checked: SkyPilot is not installed (pip install 'pgolf[cloud]')"
            if not args.dry_run:
                raise lib.LaunchError("SkyPilot is not installed; pip install 'pgolf[cloud]'") from None

    if args.dry_run:
        for plan in plans:
            print(lib.render_dry_run(plan, checked))
        return 0

    for plan in plans:
        print(f">> {plan.mode} {plan.yaml_path} on {plan.cluster} (SEED={plan.envs.get('SEED')}, "
              f"RUN_ID={plan.run_id or 'auto'})", flush=True)
        if plan.code is not None:
            print(f"   runs {plan.code.path}: {plan.code.nbytes:,} B, sha256 {plan.code.sha256}", flush=True)
        code = lib.execute(plan)
        if code != 0:
            print(f"job failed with exit code {code}; logs: sky logs {plan.cluster}; "
                  f"tear down: make down CLUSTER={plan.cluster}")
            return code
        if plan.mode != "jobs":
            print(lib.results_hint(plan))
    return 0
