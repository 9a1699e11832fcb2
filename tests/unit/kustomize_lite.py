"""Renders the kustomize subset that deploy/kubernetes uses, for machines without kustomize.

The real renderer is kustomize (``kubectl kustomize``). It cannot be installed from the package
registries this project uses (Debian's kubernetes-client is 1.20, with a kustomize that predates
the ``patches`` field), so the manifest tests render with this instead, and where ``kubectl`` is
on the PATH they check that both give the same objects.

Supported, and nothing else (any other kustomization field raises, so a new one cannot be
silently ignored):

- ``resources``: YAML files and directories holding a kustomization;
- ``patches`` with ``path``: strategic-merge patches, matched to their target by apiVersion,
  kind, namespace and name (each patch names its namespace); maps merge, ``null`` deletes a
  key, the lists below merge by their key (in kustomize's order, see ``_merge_list``), every
  other list is replaced;
- ``images``: ``name`` with ``newName``, ``newTag`` and ``digest``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Doc", "key", "merge", "render", "split_image"]

Doc = dict[str, Any]

_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
# The patchMergeKey of each list the overlays patch (k8s.io/api's struct tags); a list of ports
# merges by containerPort in a container and by port in a Service.
_MERGE_KEYS = {
    "containers": ("name",),
    "initContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),
}
_POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def key(doc: Doc) -> tuple[str, str, str, str]:
    """The identity kustomize matches patches by."""
    meta = doc.get("metadata", {})
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


def render(directory: Path) -> list[Doc]:
    """The documents ``kustomize build directory`` would give (in file order, not kustomize's)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - _FIELDS
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    docs: list[Doc] = []
    for entry in spec.get("resources", ()):
        path = directory / entry
        docs += render(path) if path.is_dir() else _load(path)
    for patch in spec.get("patches", ()):
        if set(patch) != {"path"}:
            raise ValueError(f"{directory}: only patches with a path are supported, got {patch}")
        for body in _load(directory / patch["path"]):
            _apply(docs, body, directory / patch["path"])
    for image in spec.get("images", ()):
        for doc in docs:
            _set_image(doc, image)
    return docs


def _load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _apply(docs: list[Doc], patch: Doc, source: Path) -> None:
    want = key(patch)
    matches = [d for d in docs if key(d) == want]
    if len(matches) != 1:
        raise ValueError(f"{source}: patch {want} matches {len(matches)} objects")
    merged = merge(matches[0], patch)
    matches[0].clear()
    matches[0].update(merged)


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """The strategic merge of ``patch`` into ``base`` (a new value; neither is changed)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for name, value in patch.items():
            if isinstance(name, str) and name.startswith("$"):
                raise ValueError(f"patch directive {name} is not supported")
            if value is None:
                out.pop(name, None)
            else:
                out[name] = merge(out[name], value, name) if name in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in _MERGE_KEYS:
        return _merge_list(base, patch, field)
    return copy.deepcopy(patch)


def _merge_list(base: list[Any], patch: list[Any], field: str) -> list[Any]:
    """kustomize's order: the patch's items first (merged with their namesakes), in the patch's
    order, then the base's other items in theirs. So a patched env variable moves ahead of those
    it may reference with $(NAME), which the manifest tests check for."""
    out, taken = [], set()
    for item in patch:
        merge_key = next((k for k in _MERGE_KEYS[field] if k in item), None)
        if merge_key is None:
            raise ValueError(f"{field}: item without a merge key {_MERGE_KEYS[field]}: {item}")
        at = next((i for i, old in enumerate(base) if old.get(merge_key) == item[merge_key]), None)
        out.append(copy.deepcopy(item) if at is None else merge(base[at], item))
        taken.add(at)
    return out + [copy.deepcopy(old) for i, old in enumerate(base) if i not in taken]


def _set_image(doc: Doc, image: Doc) -> None:
    if doc["kind"] not in _POD_KINDS:
        return
    spec = doc["spec"]["template"]["spec"]
    for container in [*spec.get("containers", ()), *spec.get("initContainers", ())]:
        name, tag = split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        else:
            container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else f"{name}{tag}"


def split_image(image: str) -> tuple[str, str]:
    """``registry:5000/repo:tag`` to (``registry:5000/repo``, ``:tag``); the tag part keeps its
    separator (``@sha256:...`` for a digest) and is empty when there is none."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""
