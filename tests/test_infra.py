"""The cluster manifests are valid, and every command they run exists with the arguments they pass.

- Built-in kinds (CronJob, Job, PersistentVolumeClaim, ...) are validated strictly (an unknown field is an
  error) against the Kubernetes OpenAPI schemas that kubernetes-validate ships, offline, at `K8S_VERSION`.
- KubeRay's RayCluster and RayJob are not in those schemas: their fields are checked against `KUBERAY`
  below, and the pod templates inside them strictly as core/v1 PodTemplateSpecs.
- Every `bayescurate ...` they run names an existing (sub)command, passes only its flags and exactly its
  positional arguments (`campaign step DIR`); every `ray job submit` flag is one of Ray's CLI.
- No credential is written into a manifest; every Secret they read is one the docs tell you to create,
  and every volume claim they mount is defined.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from jobs import cli
from jobs._app import ConfigCommand, resolve_target

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MANIFESTS = sorted([*INFRA.glob("k8s/*.yaml"), *INFRA.glob("ray/*.yaml")])
K8S_VERSION = "1.31"  # the Kubernetes minor validated against (the manifests need 1.27+: CronJob timeZone)
SHELL_OPERATORS = frozenset({";", "&&", "||", "|", "&", ">", ">>", "<"})
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL", re.IGNORECASE)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (p.name, doc)
        for p in MANIFESTS
        if p.parent.name == "k8s"
        for doc in yaml.safe_load_all(p.read_text())
        if doc is not None
    ]


DOCUMENTS = _documents()
BUILTIN = [(name, doc) for name, doc in DOCUMENTS if not doc["apiVersion"].startswith("ray.io/")]
KUBERAY_DOCS = [(name, doc) for name, doc in DOCUMENTS if doc["apiVersion"].startswith("ray.io/")]


def _id(item: tuple[str, dict[str, Any]]) -> str:
    return f"{item[0]}:{item[1]['kind']}"


# ------------------------------------------------------------------------------------- KubeRay fields
# The ray.io/v1 fields of RayCluster and RayJob, as KubeRay's API reference documents them (KubeRay 1.x:
# docs/reference/api.md in ray-project/kuberay, published at https://ray-project.github.io/kuberay/reference/
# api/ ; types RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, RayJobSpec, SubmitterConfig, ScaleStrategy).
# Field names and value types only; nested core/v1 types (PodTemplateSpec, Service, ResourceRequirements)
# are plain objects here, and the pod templates are validated with kubernetes-validate instead.


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "required": [*required],
    }


_STR, _INT, _BOOL, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}  # map[string]string
_CORE = {"type": "object"}  # a core/v1 type (PodTemplateSpec, Service, ...), checked elsewhere if used

_HEAD_GROUP = _object(
    {
        "template": _CORE,
        "headService": _CORE,
        "enableIngress": _BOOL,
        "rayStartParams": _STRINGS,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    },
    required=("template",),
)
_WORKER_GROUP = _object(
    {
        "suspend": _BOOL,
        "groupName": _STR,
        "replicas": _INT,
        "minReplicas": _INT,
        "maxReplicas": _INT,
        "idleTimeoutSeconds": _INT,
        "rayStartParams": _STRINGS,
        "template": _CORE,
        "scaleStrategy": _object({"workersToDelete": {"type": "array", "items": _STR}}),
        "numOfHosts": _INT,
    },
    required=("groupName", "template"),
)
_CLUSTER_SPEC = _object(
    {
        "suspend": _BOOL,
        "managedBy": _STR,
        "autoscalerOptions": _CORE,
        "headServiceAnnotations": _STRINGS,
        "enableInTreeAutoscaling": _BOOL,
        "gcsFaultToleranceOptions": _CORE,
        "headGroupSpec": _HEAD_GROUP,
        "rayVersion": _STR,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
    required=("headGroupSpec",),
)
_JOB_SPEC = _object(
    {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": _INT,
        "rayClusterSpec": _CLUSTER_SPEC,
        "submitterPodTemplate": _CORE,
        "metadata": _STRINGS,
        "clusterSelector": _STRINGS,
        "submitterConfig": _object({"backoffLimit": _INT}),
        "managedBy": _STR,
        "deletionStrategy": _CORE,
        "entrypoint": _STR,
        "runtimeEnvYAML": _STR,
        "jobId": _STR,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "entrypointResources": _STR,
        "entrypointNumCpus": _NUM,
        "entrypointNumGpus": _NUM,
        "ttlSecondsAfterFinished": _INT,
        "shutdownAfterJobFinishes": _BOOL,
        "suspend": _BOOL,
        "schedule": _STR,
    },
    required=("entrypoint",),
)


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _object(
        {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _CORE, "spec": spec},
        required=("apiVersion", "kind", "metadata", "spec"),
    )


KUBERAY = {"RayCluster": _resource("RayCluster", _CLUSTER_SPEC), "RayJob": _resource("RayJob", _JOB_SPEC)}


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(where, template) of every core/v1 PodTemplateSpec inside a RayCluster or RayJob."""
    spec = doc.get("spec", {})
    clusters = [("spec", spec)] if doc["kind"] == "RayCluster" else []
    if doc["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        if "rayClusterSpec" in spec:
            clusters.append(("spec.rayClusterSpec", spec["rayClusterSpec"]))
    for where, cluster in clusters:
        yield f"{where}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            yield f"{where}.workerGroupSpecs[{i}].template", group["template"]


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """What is wrong with a ray.io resource: fields KubeRay does not document, and invalid pod templates."""
    if doc.get("kind") not in KUBERAY:
        return [f"kind {doc.get('kind')!r} is none of the KubeRay kinds checked here ({sorted(KUBERAY)})"]
    validator = jsonschema.Draft202012Validator(KUBERAY[doc["kind"]])
    problems = [
        f"{'.'.join(map(str, e.absolute_path)) or doc['kind']}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    if doc["kind"] == "RayJob" and not {"rayClusterSpec", "clusterSelector"} & set(doc["spec"]):
        problems.append(
            "spec: needs rayClusterSpec (a cluster of its own) or clusterSelector (a running one)"
        )
    if problems:
        return problems
    checks = [("metadata", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})]
    for where, template in _pod_templates(doc):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        checks.append((where, pod))
    for where, wrapped in checks:
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{'.'.join(map(str, [where, *list(exc.path)[1:]]))}: {exc.message}")
    return problems


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses(path: Path) -> None:
    assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("item", BUILTIN, ids=_id)
def test_builtin_kinds_are_valid_kubernetes(item: tuple[str, dict[str, Any]]) -> None:
    name, doc = item
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=_id)
def test_kuberay_resources_use_documented_fields(item: tuple[str, dict[str, Any]]) -> None:
    name, doc = item
    assert kuberay_problems(doc) == [], name


def test_the_kuberay_check_catches_mistakes() -> None:
    [(_, job)] = [(n, d) for n, d in KUBERAY_DOCS if n == "rayjob-campaign-step.yaml"]
    [(_, cluster)] = [(n, d) for n, d in KUBERAY_DOCS if d["kind"] == "RayCluster"]
    typo = {**job, "spec": {**job["spec"], "entryPoint": job["spec"]["entrypoint"]}}
    assert any("entryPoint" in p for p in kuberay_problems(typo))
    nowhere = {**job, "spec": {k: v for k, v in job["spec"].items() if k != "clusterSelector"}}
    assert kuberay_problems(nowhere)  # neither its own cluster nor a running one
    head = cluster["spec"]["headGroupSpec"]
    numbers = {**head, "rayStartParams": {"num-cpus": 0}}  # KubeRay wants strings
    assert kuberay_problems({**cluster, "spec": {**cluster["spec"], "headGroupSpec": numbers}})
    pod = head["template"]["spec"]
    bad_pod = {**head, "template": {"spec": {**pod, "containers": [{"name": "x", "imag": "y"}]}}}
    problems = kuberay_problems({**cluster, "spec": {**cluster["spec"], "headGroupSpec": bad_pod}})
    assert any(p.startswith("spec.headGroupSpec.template") and "imag" in p for p in problems), problems


# ------------------------------------------------------------------------------------------ commands


def _shell_words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: not a command line
        return text.split()


def command_lines(node: Any, key: str = "") -> Iterator[list[str]]:
    """Every command line in a parsed manifest: a container's `command`/`args` (exec form, `sh -c SCRIPT`
    split as a shell does), a RayJob's `entrypoint` and the cluster launcher's `*_commands` (shell lines)."""
    if isinstance(node, dict):
        for k, value in node.items():
            yield from command_lines(value, str(k))
    elif isinstance(node, list):
        if key in ("command", "args") and all(isinstance(x, str) for x in node):
            yield list(node)
            yield from (_shell_words(x) for i, x in enumerate(node) if i and node[i - 1] == "-c")
        elif key.endswith("_commands"):
            yield from (_shell_words(x) for x in node if isinstance(x, str))
        else:
            for value in node:
                yield from command_lines(value, key)
    elif isinstance(node, str) and key == "entrypoint":
        yield _shell_words(node)


def program_calls(words: list[str], program: str) -> list[list[str]]:
    """The arguments of every `program ...` in a command line (also after `--`), up to a shell operator."""
    calls = []
    for i, word in enumerate(words):
        if os.path.basename(word) != program or (i and words[i - 1] not in {"--", "exec", *SHELL_OPERATORS}):
            continue
        args: list[str] = []
        for w in words[i + 1 :]:
            if w in SHELL_OPERATORS:
                break
            args.append(w)
        calls.append(args)
    return calls


def _manifest_calls(program: str) -> list[tuple[str, list[str]]]:
    return [
        (path.name, args)
        for path in MANIFESTS
        for doc in yaml.safe_load_all(path.read_text())
        for words in command_lines(doc)
        for args in program_calls(words, program)
    ]


def resolve_command(args: list[str]) -> tuple[str, ConfigCommand[Any] | None, list[str]]:
    """(command name, its ConfigCommand, its arguments) of `bayescurate ARGS...`, subcommands resolved."""
    if not args or args[0] not in cli.COMMANDS:
        return " ".join(args[:1]) or "(nothing)", None, args[1:]
    module = importlib.import_module(cli.COMMANDS[args[0]][0])
    table = getattr(module, "SUBCOMMANDS", None)
    if table is not None:
        if len(args) < 2 or args[1] not in table:
            return " ".join(args[:2]), None, args[2:]
        name, command, rest = f"{args[0]} {args[1]}", resolve_target(table[args[1]][0]), args[2:]
    else:
        name, command, rest = args[0], module.main, args[1:]
    return name, command if isinstance(command, ConfigCommand) else None, rest


def argument_problems(command: ConfigCommand[Any], args: list[str]) -> list[str]:
    """Unknown flags, flags without their value, and a wrong number of positional arguments."""
    takes_value = dict.fromkeys(command.option_names(), True) | {"--help": False}
    for flag, _ in command.flags:
        if flag.kind == "bool" and not flag.positional:
            takes_value[flag.option] = takes_value["--no-" + flag.option.removeprefix("--")] = False
    problems, positional, i = [], [], 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        if not name.startswith("--"):
            positional.append(args[i])
        elif name not in takes_value:
            problems.append(f"unknown flag {name}")
        elif takes_value[name] and not eq:
            if i + 1 == len(args) or args[i + 1].startswith("--"):
                problems.append(f"{name} needs a value")
            i += 1
        i += 1
    expected = [flag.param for flag, _ in command.flags if flag.positional]
    if len(positional) != len(expected):
        problems.append(f"takes the positional arguments {expected}, got {positional}")
    return problems


def test_commands_in_manifests_exist_and_get_their_arguments() -> None:
    calls = _manifest_calls("bayescurate")
    names = set()
    for where, args in calls:
        name, command, rest = resolve_command(args)
        names.add(name)
        assert command is not None, f"{where}: `bayescurate {name}` is no command with options"
        assert argument_problems(command, rest) == [], (where, args)
    assert names >= {"fit-posterior", "embed", "campaign step"}


def test_a_wrong_command_line_would_be_caught() -> None:
    argv = ["ray", "job", "submit", "--", "bayescurate", "embed", "--images", "x", "--bogus"]
    [words] = command_lines({"command": argv, "metadata": {"labels": {"app": "bayescurate"}}})
    [args] = program_calls(words, "bayescurate")
    name, command, rest = resolve_command(args)
    assert name == "embed" and command is not None
    assert argument_problems(command, rest) == ["unknown flag --bogus"]
    [args] = program_calls(
        _shell_words("cd /app && bayescurate campaign step --force; echo done"), "bayescurate"
    )
    name, command, rest = resolve_command(args)
    assert name == "campaign step" and command is not None
    assert argument_problems(command, rest) == ["takes the positional arguments ['dir'], got []"]
    assert argument_problems(command, ["/a", "/b"]) == [
        "takes the positional arguments ['dir'], got ['/a', '/b']"
    ]
    assert resolve_command(["campaign", "tick", "/a"])[1] is None


def test_ray_job_submit_flags_exist() -> None:
    from ray.dashboard.modules.job.cli import submit

    options = {opt for param in submit.params for opt in param.opts}
    submits = [(w, a[2:]) for w, a in _manifest_calls("ray") if a[:2] == ["job", "submit"]]
    assert len(submits) >= 2
    for where, args in submits:
        ours = args[: args.index("--")] if "--" in args else args
        flags = {a.partition("=")[0] for a in ours if a.startswith("-")}
        assert flags <= options, (where, flags - options)


# ------------------------------------------------------------------------- secrets, volumes, schedules


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def _find(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from _find(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _find(value, key)


def _docs_section(page: str, title: str) -> str:
    text = (REPO / "docs" / page).read_text()
    start = text.find(f" {title}\n")
    assert start >= 0, f"docs/{page} has no section {title!r}"
    end = re.search(r"^#{2,3} ", text[start + len(title) + 2 :], re.MULTILINE)
    return text[start : start + len(title) + 2 + (end.start() if end else len(text))]


def test_no_credential_is_written_into_a_manifest() -> None:
    assert not [n for n, d in DOCUMENTS if d["kind"] == "Secret"]  # Secrets are created, never shipped
    for name, doc in DOCUMENTS:
        for container in _containers(doc):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                        name,
                        env["name"],
                    )


def test_every_secret_read_is_one_the_docs_create_and_every_claim_is_defined() -> None:
    section = _docs_section("cluster.md", "Run it on a schedule")
    read = {
        ref["name"]
        for _, doc in DOCUMENTS
        for key in ("secretKeyRef", "secretRef")
        for ref in _find(doc, key)
    }
    assert {"bayescurate-label-studio", "bayescurate-mlflow"} <= read
    for secret in read:
        assert f"secret generic {secret}" in section, (
            f"docs/cluster.md does not say how to create Secret {secret!r}"
        )
    claims = {c["claimName"] for _, doc in DOCUMENTS for c in _find(doc, "persistentVolumeClaim")}
    defined = {d["metadata"]["name"] for _, d in DOCUMENTS if d["kind"] == "PersistentVolumeClaim"}
    assert claims and claims <= defined, claims - defined


def test_cron_jobs_never_overlap_and_skip_late_ticks() -> None:
    crons = [(n, d["spec"]) for n, d in DOCUMENTS if d["kind"] == "CronJob"]
    assert {n for n, _ in crons} >= {"cronjob-campaign-step.yaml"}
    for name, spec in crons:
        assert spec["concurrencyPolicy"] == "Forbid", name
        assert spec["startingDeadlineSeconds"] > 0, name
        assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1, name


def test_the_cluster_runs_the_ray_version_the_package_is_tested_with() -> None:
    import ray

    versions = {d["spec"]["rayVersion"] for _, d in DOCUMENTS if d["kind"] == "RayCluster"}
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)", (INFRA / "docker" / "Dockerfile").read_text(), re.M)
    assert base is not None
    assert versions == {ray.__version__} == {base.group(1)}
