"""`pgolf launch`: turn a sky/*.yaml plus a few overrides into a SkyPilot task, and either print it
(`--dry-run`, offline) or launch it through SkyPilot's Python API and stream its logs.

One plan per job. A plan is plain data (the YAML after overrides, the secrets' names and whether
we found values for them, the equivalent `sky` command), so the dry run, the tests and the real
launch all look at the same object. SkyPilot is imported only inside the functions that need it:
`pgolf --help` and `pgolf results` never pay for it.

The offline checks (`validate_task`) are the ones shared/docs/cloud-launch.md section 2.2 lists:
SkyPilot's schema and semantic checks, storage specs, and each candidate cloud's feature support.
`record_rule_violations` adds the project's own rules for record attempts (8 x H100 SXM, one
node, on demand, a pinned image), which SkyPilot cannot check without its catalog.
"""

from __future__ import annotations

import copy
import difflib
import logging
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from pgolf import config as cfgmod
from pgolf.errors import PgolfError

if TYPE_CHECKING:
    from pgolf.submission.bundle import ShippedFile

log = logging.getLogger(__name__)

Mode = Literal["launch", "exec", "jobs"]
DEFAULT_YAML = "sky/record.yaml"
# A task that declares CODE_ENV runs the generated single file: pgolf launch writes it to SHIP_PATH in
# the task's workdir (synced to the node with it) and passes its sha256, which the node checks.
SHIP_PATH = Path("ship/train_gpt.py")
CODE_ENV = "CODE_SHA256"
MASK = "****"
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# Accelerators that are 8 x H100 SXM: RunPod names SXM `H100-SXM`; the SXM clouds call it `H100`.
SXM_H100_CLOUDS = {"aws", "gcp", "lambda", "nebius"}


class LaunchError(PgolfError):
    """A launch that cannot go ahead as asked (bad YAML, missing value, cloud refusal)."""


@dataclass(frozen=True)
class LaunchPlan:
    yaml_path: str
    mode: Mode  # launch: new/reused cluster; exec: run only, on a warm cluster; jobs: managed job
    cluster: str  # cluster name, or the managed job's name
    envs: dict[str, str]  # only the values we override on top of the YAML
    secrets: dict[str, str | None]  # every secret the YAML declares -> value (None: none found)
    image_id: str | None = None  # `docker:...` replacing the YAML's image_id
    idle_minutes: int | None = 10
    down: bool = True
    retry_until_up: bool = False
    num_nodes: int | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # the YAML as loaded
    code: "ShippedFile | None" = None  # the train_gpt.py the node runs (tasks that declare CODE_SHA256)

    @property
    def run_id(self) -> str:
        return self.envs.get("RUN_ID", "")

    @property
    def missing_secrets(self) -> list[str]:
        return [name for name, value in self.secrets.items() if value is None]


# ---------------------------------------------------------------------------------------------
# building a plan (pure Python, no SkyPilot)


def read_task_yaml(path: str | Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise LaunchError("PyYAML is missing; install the cloud extra: pip install 'pgolf[cloud]'") from None
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"task file {p} not found; pick one of sky/*.yaml")
    docs = [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise LaunchError(f"{p} must hold exactly one YAML mapping (a single SkyPilot task)")
    return docs[0]


def cluster_name(user: str, seed: int | str, prefix: str = "pgolf") -> str:
    """`pgolf-<user>-s<seed>`: lower case, letters/digits/dashes, as every cloud accepts."""
    safe_user = re.sub(r"[^a-z0-9]+", "-", user.lower()).strip("-") or "user"
    return f"{prefix}-{safe_user}-s{seed}"[:40].rstrip("-")


def image_id_for(image: str) -> str:
    """`docker:<image>` for SkyPilot; refuses a moving `:latest` tag or an untagged name."""
    ref = image[len("docker:"):] if image.startswith("docker:") else image
    name = ref.split("@", 1)[0]
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
    if _DIGEST.search(ref) is None and (tag is None or tag == "latest"):
        raise LaunchError(
            f"image {image!r} is not pinned; use a version tag or @sha256 digest, never :latest"
        )
    return f"docker:{ref}"


def image_is_pinned(image_id: str) -> bool:
    """A `docker:` image with a @sha256 digest or an explicit tag other than `latest`."""
    if not image_id.startswith("docker:"):
        return False
    try:
        image_id_for(image_id)
    except LaunchError:
        return False
    return True


def image_digest_of(image: str) -> str:
    match = _DIGEST.search(image)
    return match.group(0)[1:] if match else ""


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (the CLI's --env) -> dict; a pair without `=` is a mistake."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaunchError(f"--env {pair!r} must look like NAME=VALUE")
        out[key.strip().upper()] = value
    return out


def check_env_names(envs: Mapping[str, str], yaml_envs: Mapping[str, Any]) -> None:
    """Every override must be a YAML env or a config field, and config values must parse.

    Catching `TTT_LRR=1e-4` or `SEED=abc` here costs nothing; on the cluster it costs a boot.
    """
    types = cfgmod.field_types()
    known = set(yaml_envs) | {name.upper() for name in types}
    for key, value in envs.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            tip = f" (did you mean {close[0]}?)" if close else ""
            raise LaunchError(f"--env {key} is neither an env of the task nor a config field{tip}")
        if key.lower() in types and value != "":
            cfgmod.parse_value(key.lower(), value, types[key.lower()][1])


def check_required_envs(yaml_path: str | Path, yaml_envs: Mapping[str, Any], overrides: Mapping[str, str],
                        filled: tuple[str, ...] = ()) -> None:
    """Every env the YAML leaves null has a value (or is one pgolf fills: `filled`)."""
    missing = [k for k, v in yaml_envs.items() if v is None and not overrides.get(k) and k not in filled]
    if missing:
        flags = " ".join(f"--env {k}=..." for k in missing)
        raise LaunchError(f"{Path(yaml_path).name} needs {', '.join(missing)}; pass {flags}")


def ships_code(config: Mapping[str, Any]) -> bool:
    """Does this task run the generated train_gpt.py (it declares CODE_SHA256)?"""
    return CODE_ENV in (config.get("envs") or {})


def task_run_config(config: Mapping[str, Any], overrides: Mapping[str, str]) -> cfgmod.Config:
    """The config train_gpt.py resolves on the node: PRESET, then the task's config envs (YAML values
    with the overrides on top), and nothing from this machine's environment."""
    envs = {**{k: v for k, v in (config.get("envs") or {}).items() if v is not None}, **overrides}
    types = cfgmod.field_types()
    values = {k.lower(): str(v) for k, v in envs.items() if k.lower() in types}
    return cfgmod.resolve(str(envs.get("PRESET") or "seed"), values, env={})


def ship_code(yaml_path: str | Path, overrides: Mapping[str, str] | None = None) -> "ShippedFile":
    """Generate train_gpt.py for the task's config into <workdir>/ship/ (synced with the workdir).

    The same deterministic bundler as `pgolf submission build`, from this checkout: the node runs
    these bytes, counts them as code bytes and records their sha256 in environment.json.
    """
    from pgolf.submission.bundle import BundleError, write_shipped

    config = read_task_yaml(yaml_path)
    overrides = {k.upper(): str(v) for k, v in (overrides or {}).items()}
    check_env_names(overrides, dict(config.get("envs") or {}))
    check_required_envs(yaml_path, dict(config.get("envs") or {}), overrides, filled=(CODE_ENV,))
    workdir = config.get("workdir")
    if not isinstance(workdir, str):
        raise LaunchError(f"{Path(yaml_path).name} runs {SHIP_PATH} but has no local `workdir:` to ship it with")
    try:
        return write_shipped(task_run_config(config, overrides), Path(workdir) / SHIP_PATH)
    except BundleError as exc:
        raise LaunchError(f"cannot generate {SHIP_PATH}: {exc}") from None


def plan_launch(
    yaml_path: str | Path,
    *,
    mode: Mode = "launch",
    cluster: str,
    envs: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
    image: str | None = None,
    image_digest: str | None = None,
    idle_minutes: int | None = 10,
    down: bool = True,
    retry_until_up: bool = False,
    num_nodes: int | None = None,
    code: "ShippedFile | None" = None,
    lookup: Callable[[str], str] = cfgmod.env_flag,
) -> LaunchPlan:
    """Everything a launch needs, checked before any money is spent.

    Secrets the YAML declares are taken from `secrets` or else from the local environment
    (`lookup`, like `sky launch --secret NAME`); their values never leave the plan unmasked.
    """
    config = read_task_yaml(yaml_path)
    yaml_envs: dict[str, Any] = dict(config.get("envs") or {})
    overrides = {k.upper(): str(v) for k, v in (envs or {}).items()}
    check_env_names(overrides, yaml_envs)
    if code is not None and CODE_ENV in yaml_envs:
        overrides[CODE_ENV] = code.sha256
    image_id = image_id_for(image) if image else None
    if image:
        overrides.setdefault("IMAGE", image_id[len("docker:"):])
        overrides.setdefault("IMAGE_DIGEST", image_digest or image_digest_of(image))
    for name in ("IMAGE", "IMAGE_DIGEST"):  # only envs the task declares reach the node
        if name in overrides and name not in yaml_envs:
            overrides.pop(name)
    check_required_envs(yaml_path, yaml_envs, overrides)
    given = dict(secrets or {})
    declared: dict[str, Any] = dict(config.get("secrets") or {})
    found: dict[str, str | None] = {}
    for name, default in declared.items():
        value = given.get(name) or lookup(name) or (str(default) if default is not None else None)
        found[name] = value
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise LaunchError(f"secret(s) {', '.join(unknown)} are not declared in {Path(yaml_path).name}")
    return LaunchPlan(str(yaml_path), mode, cluster, overrides, found, image_id, idle_minutes,
                      down, retry_until_up, num_nodes, config, code)


# ---------------------------------------------------------------------------------------------
# showing a plan


def resolved_config(plan: LaunchPlan, mask: bool = True) -> dict[str, Any]:
    """The task as SkyPilot will see it: YAML + env overrides + image + secrets (masked)."""
    cfg = copy.deepcopy(plan.config)
    cfg["envs"] = {**{k: ("" if v is None else str(v)) for k, v in (cfg.get("envs") or {}).items()},
                   **plan.envs}
    if plan.secrets:
        cfg["secrets"] = {k: (MASK if mask and v else v) for k, v in plan.secrets.items()}
    if plan.image_id:
        cfg.setdefault("resources", {})["image_id"] = plan.image_id
    if plan.num_nodes:
        cfg["num_nodes"] = plan.num_nodes
    return cfg


def describe_resources(resources: Mapping[str, Any], num_nodes: int) -> list[str]:
    base = {k: v for k, v in resources.items() if k != "any_of"}
    options = resources.get("any_of") or [{}]
    lines = []
    for option in options:
        merged = {**base, **option}
        spot = "spot" if merged.get("use_spot") else "on demand"
        infra = merged.get("infra", "any cloud")
        acc = merged.get("accelerators", f"cpus {merged.get('cpus', '?')}")
        lines.append(f"{infra} {acc} x {num_nodes} node(s), {spot}")
    lines.append(f"image {base.get('image_id', '(cloud default)')}, disk {base.get('disk_size', '?')} GB")
    return lines


def sky_command(plan: LaunchPlan) -> list[str]:
    """The `sky` CLI line that does what `pgolf launch` does through the Python API."""
    if plan.mode == "exec":
        cmd = ["sky", "exec", plan.cluster, plan.yaml_path]
    elif plan.mode == "jobs":
        cmd = ["sky", "jobs", "launch", "-y", "-n", plan.cluster, plan.yaml_path]
    else:
        cmd = ["sky", "launch", "-y", "-c", plan.cluster, plan.yaml_path]
    if plan.image_id and plan.mode != "exec":
        cmd += ["--image-id", plan.image_id]
    if plan.num_nodes and plan.mode != "exec":
        cmd += ["--num-nodes", str(plan.num_nodes)]
    for key, value in plan.envs.items():
        cmd += ["--env", f"{key}={value}"]
    if plan.mode != "exec":
        for name, value in plan.secrets.items():
            if value is None or value:  # optional secrets left empty stay off the line
                cmd += ["--secret", name]  # value read from your environment, never on the line
    if plan.mode == "launch":
        if plan.idle_minutes is not None:
            cmd += ["-i", str(plan.idle_minutes)]
        if plan.down:
            cmd.append("--down")
        if plan.retry_until_up:
            cmd.append("--retry-until-up")
    return cmd


def render_dry_run(plan: LaunchPlan, validation: str) -> str:
    cfg = resolved_config(plan)
    wrote = f" (wrote {plan.code.path})" if plan.code is not None else ""
    out = [f"# pgolf launch --dry-run: nothing was sent anywhere{wrote}",
           f"task:      {plan.yaml_path} ({cfg.get('name', '?')})",
           f"mode:      {plan.mode}   {'job' if plan.mode == 'jobs' else 'cluster'}: {plan.cluster}"]
    for line in describe_resources(cfg.get("resources") or {}, int(cfg.get("num_nodes", 1))):
        out.append(f"resources: {line}")
    if plan.code is not None:
        c = plan.code
        out.append(f"code:      {c.path} ({c.nbytes:,} B, sha256 {c.sha256})")
        out.append(f"           generated now by the submission bundler ({c.form} form, preset {c.preset}, "
                   f"commit {c.commit or 'unknown'}); the node checks this sha256, runs this file and "
                   f"counts these bytes")
    if plan.mode == "launch":
        stop = f"{plan.idle_minutes} idle min" if plan.idle_minutes is not None else "off"
        out.append(f"autostop:  {stop}{', then tear down' if plan.down else ''}")
    out.append("envs:")
    out += [f"  {k}={v}" for k, v in cfg["envs"].items()]
    out.append("secrets:")
    for name, value in plan.secrets.items():
        if value is None:
            shown = f"<missing: export {name} or pass --secret {name}=...>"
        else:
            shown = MASK if value else "(empty, optional)"
        out.append(f"  {name}={shown}")
    for block in ("setup", "run"):
        if cfg.get(block) and not (block == "setup" and plan.mode == "exec"):
            out.append(f"{block}:")
            out += [f"  | {line}" for line in str(cfg[block]).rstrip().splitlines()]
    out.append(f"checked:   {validation}")
    out.append("equivalent command:")
    out.append("  " + shlex.join(sky_command(plan)))
    return "\n".join(out) + "\n"


def results_hint(plan: LaunchPlan) -> str:
    uri = plan.envs.get("RESULTS_URI") or str((plan.config.get("envs") or {}).get("RESULTS_URI") or "")
    run_id = plan.run_id or "<run_id from the log>"
    uri = uri or "$RESULTS_URI"
    return (f"results: make results RUN_ID={run_id} RESULTS_URI={uri}   "
            f"(or: pgolf results pull {run_id} --from {uri})")


# ---------------------------------------------------------------------------------------------
# SkyPilot: build, check offline, launch


def import_sky() -> Any:
    """`import sky`, quietly: its DB migrations log every alembic plugin at INFO otherwise."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import sky

    return sky


def build_task(plan: LaunchPlan, placeholder_secret: str = "unset") -> Any:
    """A `sky.Task` from the plan (secrets without a value get a placeholder, for checking only)."""
    sky = import_sky()

    config = copy.deepcopy(plan.config)
    env_overrides = list(plan.envs.items())
    secret_overrides = [(k, v if v is not None else placeholder_secret) for k, v in plan.secrets.items()]
    try:
        task = sky.Task.from_yaml_config(config, env_overrides=env_overrides or None,
                                         secrets_overrides=secret_overrides or None)
        if plan.image_id:
            task.set_resources_override({"image_id": plan.image_id})
        if plan.num_nodes:
            task.num_nodes = plan.num_nodes
    except Exception as exc:  # SkyPilot raises ValueError, schema and NotSupported errors
        raise LaunchError(f"{plan.yaml_path}: SkyPilot rejected the task: {_one_line(exc)}") from None
    return task


def validate_task(task: Any) -> list[str]:
    """Storage specs and per-cloud feature support, offline; returns the clouds checked."""
    from sky import clouds

    features_for_storage: set = set()
    for storage in (task.storage_mounts or {}).values():
        try:
            storage._validate_storage_spec(storage.name)  # private in 0.14.1; pinned version
        except Exception as exc:
            raise LaunchError(f"storage {storage.name!r}: {_one_line(exc)}") from None
        if str(storage.mode.value).upper() in ("MOUNT", "MOUNT_CACHED"):
            features_for_storage.add(clouds.CloudImplementationFeatures.STORAGE_MOUNTING)
    checked: list[str] = []
    for res in task.resources:
        features = set(res.get_required_cloud_features()) | features_for_storage
        if task.num_nodes > 1:
            features.add(clouds.CloudImplementationFeatures.MULTI_NODE)
        autostop = res.autostop_config
        if autostop is not None and autostop.enabled:
            features.add(clouds.CloudImplementationFeatures.AUTODOWN if autostop.down
                         else clouds.CloudImplementationFeatures.AUTOSTOP)
        if res.cloud is None:
            checked.append("any cloud")
            continue
        try:
            res.cloud.check_features_are_supported(res, features)
        except Exception as exc:
            raise LaunchError(f"{res.cloud}: {_one_line(exc)}") from None
        checked.append(str(res.cloud))
    return checked


def record_rule_violations(config: Mapping[str, Any]) -> list[str]:
    """Project rules for a record attempt; [] when the task is a valid record setup."""
    problems: list[str] = []
    resources = dict(config.get("resources") or {})
    options = resources.pop("any_of", None) or [{}]
    if int(config.get("num_nodes", 1)) != 1:
        problems.append(f"num_nodes is {config.get('num_nodes')}, a record runs on one node")
    for option in options:
        merged = {**resources, **option}
        infra = str(merged.get("infra", "")).split("/")[0].lower()
        acc = str(merged.get("accelerators", "")).replace(" ", "")
        if merged.get("use_spot"):
            problems.append(f"{infra or 'resources'}: use_spot, a record must run on demand")
        if infra == "runpod" and acc != "H100-SXM:8":
            problems.append(f"runpod asks for {acc!r}; RunPod's SXM H100 is 'H100-SXM:8' (H100 = PCIe)")
        elif infra in SXM_H100_CLOUDS and acc != "H100:8":
            problems.append(f"{infra} asks for {acc!r}; its 8 x H100 SXM box is 'H100:8'")
        elif infra not in SXM_H100_CLOUDS | {"runpod"}:
            problems.append(f"infra {infra or '(unset)'!r} is not a known 8 x H100 SXM source")
        image = str(merged.get("image_id", ""))
        if not image_is_pinned(image):
            problems.append(f"image_id {image!r} is not a pinned docker image (tag or @sha256, not :latest)")
    return problems


def check_plan(plan: LaunchPlan) -> str:
    """Build + validate offline; a one-line summary of what was checked (for the dry run)."""
    sky = import_sky()

    task = build_task(plan)
    clouds_checked = validate_task(task)
    summary = f"skypilot {sky.__version__}: schema, storage, features on {', '.join(clouds_checked)}"
    if Path(plan.yaml_path).name.startswith("record"):
        problems = record_rule_violations(resolved_config(plan))
        if problems:
            raise LaunchError(f"{plan.yaml_path} breaks the record rules: {'; '.join(problems)}")
        summary += "; record rules (8 x H100 SXM, 1 node, on demand, pinned image)"
    return summary


def execute(plan: LaunchPlan) -> int:
    """Launch for real and stream the job's logs; returns the job's exit code (0 = success)."""
    if plan.missing_secrets:
        names = ", ".join(plan.missing_secrets)
        raise LaunchError(f"no value for secret(s) {names}; export them or pass --secret NAME=VALUE")
    sky = import_sky()

    task = build_task(plan)
    started = time.monotonic()
    try:
        if plan.mode == "jobs":
            job_ids, _ = sky.stream_and_get(sky.jobs.launch(task, name=plan.cluster))
            log.info("managed job %s submitted; follow it with: sky jobs logs -n %s", job_ids, plan.cluster)
            return 0
        if plan.mode == "exec":
            request = sky.exec(task, cluster_name=plan.cluster)
        else:
            request = sky.launch(task, cluster_name=plan.cluster, retry_until_up=plan.retry_until_up,
                                 idle_minutes_to_autostop=plan.idle_minutes, down=plan.down)
        # (job_id, handle), or (job_id, handle, credentials) from servers that bundle them
        job_id = sky.stream_and_get(request)[0]
        # provisioning + file sync + setup, as the launching machine saw it (the node cannot)
        log.info("%s of %s took %.0f s before the job started", plan.mode, plan.cluster,
                 time.monotonic() - started)
        if job_id is None:
            raise LaunchError(f"SkyPilot submitted no job to {plan.cluster}; does {plan.yaml_path} have a run?")
        return int(sky.tail_logs(plan.cluster, job_id, follow=True))
    except PgolfError:
        raise
    except Exception as exc:
        raise LaunchError(
            f"SkyPilot {plan.mode} on {plan.cluster} failed: {_one_line(exc)}",
            hint=f"inspect with `sky status {plan.cluster}`; tear down with `make down CLUSTER={plan.cluster}`",
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] or type(exc).__name__
