"""`lowtune upload`: publish a model or adapter folder to Hugging Face, ModelScope or OpenXLab.

DIR is a merged/plain model folder, a PEFT adapter folder, or a run folder (its adapter, or its full fine-tuned
model). Before anything is sent, the model card is written (none there) or checked and completed (hub front matter:
library_name, pipeline_tag, a hub-id base_model, never a local path), and ModelScope gets its `configuration.json`.
`--dry-run` prints exactly what would go where (every file, its size, the repo, the endpoint) and changes nothing.

Clients: `huggingface_hub` (create_repo exist_ok + upload_folder; endpoint `$HF_ENDPOINT`, token from --token,
`$HF_TOKEN` or `hf auth login`) and `modelscope` (HubApi create_model + upload_folder; endpoint
`$MODELSCOPE_ENDPOINT`/`$MODELSCOPE_DOMAIN`, token from --token, `$MODELSCOPE_API_TOKEN` or `modelscope login`).
OpenXLab's SDK pins old versions of shared packages, so it is never installed here: lowtune writes the
`metafile.yml` its CLI wants and prints the exact steps to run it from a separate environment. Tokens are never
printed.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowtune.errors import UserError, require
from lowtune.export.card import MODELSCOPE_CONFIGURATION, CardInfo, card_for_run, hub_id_or_none, read_front_matter
from lowtune.models.download import answers, endpoint, is_offline
from lowtune.models.resolve import HUB_ID
from lowtune.runs import FULL_MODEL_DIR, Located, is_run_folder, locate_folder

TARGETS = ("hf", "modelscope", "openxlab")
IGNORED = (".git", ".git/*", ".cache/*", ".cache", "__pycache__/*", "*.pyc", ".ms_upload_cache/*", ".DS_Store",
           "*.tmp", ".*.tmp-*", ".*.tmp-*/*")
METAFILE = "metafile.yml"
FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", re.S)


# --- what is being published --------------------------------------------------------------------------------------

def locate_publishable(target: str | Path) -> Located:
    """RUN, ADAPTER or MODEL folder -> the folder to publish and what is known about how it was made."""
    path = Path(target).expanduser()
    found = locate_folder(path)
    # chat falls back to a run's newest checkpoint; publishing takes only what training finished
    if is_run_folder(path) and found.weights not in (found.run.adapter_dir, found.run.full_model_dir):
        raise UserError(f"{path} has no adapter/ or {FULL_MODEL_DIR}/ yet; train it first (or give the folder to "
                        "publish)")
    return found


def check_repo_id(repo: str) -> str:
    if not repo or not HUB_ID.match(repo):
        raise UserError(f"--repo '{repo}' must look like owner/name (letters, digits, '-', '_', '.')")
    return repo


# --- the card -----------------------------------------------------------------------------------------------------

@dataclass
class CardPlan:
    """What happens to README.md before upload: written, completed, or kept as it is."""

    action: str
    """'write', 'complete' or 'keep'."""
    text: str
    notes: list[str] = field(default_factory=list)


def plan_card(pub: Located, repo: str) -> CardPlan:
    readme = pub.weights / "README.md"
    library = "peft" if pub.kind == "adapter" else "transformers"
    base_hub = hub_id_or_none(pub.base_spec) if pub.base_spec else None
    if not readme.is_file():
        info = card_for_run(repo.split("/")[-1], pub.config, None, library_name=library,
                            base_spec=pub.base_spec) if pub.config else \
            CardInfo(title=repo.split("/")[-1], base_model=base_hub, library_name=library)
        return CardPlan("write", info.render(), ["no model card: writing one"])
    text = readme.read_text(encoding="utf-8", errors="replace")
    fixed, notes = complete_front_matter(front_matter_of(readme, text), library, base_hub)
    if not notes:
        return CardPlan("keep", text)
    head = yaml.safe_dump(fixed, sort_keys=False, allow_unicode=True, width=1000)
    body = FRONT_MATTER.sub("", text, count=1).lstrip("\n")
    return CardPlan("complete", f"---\n{head}---\n\n{body}", notes)


def front_matter_of(readme: Path, text: str) -> dict:
    """The card's YAML front matter ({} when it has none); broken YAML is the user's to fix, not ours to drop."""
    match = FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{readme}: the front matter between the '---' lines is not valid YAML ({exc.problem}); "
                        "fix it or delete README.md to get a new card") from None
    if not isinstance(meta, dict):
        raise UserError(f"{readme}: the front matter must be a YAML mapping (key: value lines)")
    return meta


def complete_front_matter(meta: dict, library_name: str, base_hub: str | None) -> tuple[dict, list[str]]:
    """The card's front matter with what the hubs need filled in, and a note for every change."""
    fixed, notes = dict(meta), []
    if "library_name" not in fixed:
        fixed["library_name"] = library_name
        notes.append(f"card: added library_name: {library_name}")
    if "pipeline_tag" not in fixed:
        fixed["pipeline_tag"] = "text-generation"
        notes.append("card: added pipeline_tag: text-generation")
    base = fixed.get("base_model")
    if isinstance(base, str) and not hub_id_or_none(base):
        del fixed["base_model"]  # a local path: the hubs reject it and it leaks a file-system layout
        notes.append(f"card: removed base_model '{base}' (a local path, not a hub id)")
    if "base_model" not in fixed and base_hub:
        fixed["base_model"] = base_hub
        notes.append(f"card: added base_model: {base_hub}")
    tags = [str(t) for t in fixed.get("tags") or []]
    local = [t for t in tags if t.startswith("base_model:") and not hub_id_or_none(t.split(":")[-1])]
    if local:  # peft tags adapters "base_model:adapter:<base>", a local path here
        notes.append(f"card: removed tag(s) naming a local path: {', '.join(local)}")
    fixed["tags"] = [t for t in tags if t not in local] + (["lowtune"] if "lowtune" not in tags else [])
    return fixed, notes


# --- the plan -----------------------------------------------------------------------------------------------------

@dataclass
class UploadPlan:
    pub: Located
    to: str
    repo: str
    private: bool
    endpoint: str
    files: list[tuple[str, int]]
    """(path in repo, size in bytes), as they will arrive (generated files included)."""
    card: CardPlan
    extra_files: dict[str, str] = field(default_factory=dict)
    """Files lowtune writes into the folder before uploading (configuration.json, metafile.yml)."""

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)


def ignored(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORED) or rel.split("/")[0].startswith(".")


def folder_files(folder: Path) -> list[tuple[str, int]]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not ignored(rel):
            files.append((rel, path.stat().st_size))
    return files


def endpoint_for(to: str) -> str:
    return endpoint(to) if to in ("hf", "modelscope") else "https://openxlab.org.cn"


def make_plan(target: str | Path, to: str, repo: str, private: bool = False) -> UploadPlan:
    if to not in TARGETS:
        raise UserError(f"--to must be one of {', '.join(TARGETS)} (got '{to}')")
    pub = locate_publishable(target)
    repo = check_repo_id(repo)
    card = plan_card(pub, repo)
    extra: dict[str, str] = {}
    if to == "modelscope" and not (pub.weights / "configuration.json").is_file():
        import json

        extra["configuration.json"] = json.dumps(MODELSCOPE_CONFIGURATION, indent=2) + "\n"
    sizes = dict(folder_files(pub.weights))
    if card.action != "keep":
        sizes["README.md"] = len(card.text.encode())
    for name, text in extra.items():
        sizes[name] = len(text.encode())
    if to == "openxlab":
        extra[METAFILE] = openxlab_metafile(repo, sorted(sizes), pub)
        sizes[METAFILE] = len(extra[METAFILE].encode())
    return UploadPlan(pub, to, repo, private, endpoint_for(to), sorted(sizes.items()), card, extra)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def describe(plan: UploadPlan, dry_run: bool) -> str:
    """The plan as text: the repo, endpoint, visibility, the card, and every file with its size."""
    verb = "would upload" if dry_run else "uploading"
    where = {"hf": "Hugging Face", "modelscope": "ModelScope", "openxlab": "OpenXLab"}[plan.to]
    lines = [f"{verb} {plan.pub.kind} {plan.pub.weights} -> {where} {plan.repo} "
             f"({'private' if plan.private else 'public'}) at {plan.endpoint}"]
    prefix = "would " if dry_run else ""
    card_line = {"write": f"  card: {prefix}write README.md (model card with hub front matter)",
                 "complete": f"  card: {prefix}complete README.md front matter",
                 "keep": "  card: README.md front matter is complete (kept as is)"}[plan.card.action]
    lines.append(card_line)
    lines += [f"    {note}" for note in plan.card.notes if plan.card.action == "complete"]
    for name in plan.extra_files:
        lines.append(f"  {prefix}write {name}")
    width = max((len(p) for p, _ in plan.files), default=4)
    lines += [f"  {path:<{width}}  {human_size(size):>9}" for path, size in plan.files]
    lines.append(f"  {len(plan.files)} files, {human_size(plan.total)}")
    return "\n".join(lines)


def write_generated(plan: UploadPlan) -> None:
    """Write the card and the hub-specific files into the folder (the upload sends the folder as it is)."""
    if plan.card.action != "keep":
        (plan.pub.weights / "README.md").write_text(plan.card.text, encoding="utf-8")
    for name, text in plan.extra_files.items():
        (plan.pub.weights / name).write_text(text, encoding="utf-8")


def check_hub_ready(plan: UploadPlan) -> None:
    """What would stop the upload and can be known before the card is written into the folder."""
    if plan.to == "hf" and is_offline():
        raise UserError("HF_HUB_OFFLINE=1 is set, which blocks every upload; unset it for this command")
    if not answers(plan.endpoint):
        setting = "HF_ENDPOINT" if plan.to == "hf" else "MODELSCOPE_DOMAIN"
        raise UserError(f"cannot reach {plan.endpoint}: nothing was written or uploaded; check the network or "
                        f"{setting}")


# --- Hugging Face -------------------------------------------------------------------------------------------------

def upload_hf(plan: UploadPlan, token: str | None) -> str:
    hub = require("huggingface_hub", "hub", "upload to Hugging Face")
    from huggingface_hub.errors import HfHubHTTPError

    token = token or hub.get_token()
    if not token:
        raise UserError(f"no Hugging Face token: {LOGIN_HINT['Hugging Face']}")
    api = hub.HfApi(endpoint=plan.endpoint, token=token)
    try:
        url = api.create_repo(plan.repo, private=plan.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=plan.repo, folder_path=str(plan.pub.weights), repo_type="model",
                                 commit_message=f"Upload {plan.pub.kind} with lowtune",
                                 ignore_patterns=list(IGNORED) + [".*"])
    except HfHubHTTPError as exc:
        raise UserError(_hub_error("Hugging Face", plan, exc.response.status_code if exc.response is not None
                                   else None, str(exc).splitlines()[0])) from None
    return f"{url} (commit {getattr(info, 'oid', '')[:10]})"


LOGIN_HINT = {"Hugging Face": "pass --token, set HF_TOKEN or run `hf auth login`",
              "ModelScope": "pass --token, set MODELSCOPE_API_TOKEN or run `modelscope login`"}


def _hub_error(name: str, plan: UploadPlan, status: int | None, detail: str) -> str:
    if status in (401, 403):
        return f"{name} refused the token for {plan.repo} ({status}): use one with write access ({LOGIN_HINT[name]})"
    return f"{name} upload of {plan.repo} failed ({status or 'no answer'}): {detail}"


# --- ModelScope ---------------------------------------------------------------------------------------------------

def upload_modelscope(plan: UploadPlan, token: str | None) -> str:
    require("modelscope", "hub", "upload to ModelScope")
    from modelscope.hub.api import HubApi

    # read here, not left to the client: it caches the variable process-wide on first use
    token = token or os.environ.get("MODELSCOPE_API_TOKEN") or None
    api = HubApi(endpoint=plan.endpoint, token=token)  # a token given here is used, never saved to disk
    try:
        if not api.repo_exists(plan.repo):
            api.create_model(plan.repo, visibility=1 if plan.private else 5, license=_ms_license(plan))
        api.upload_folder(repo_id=plan.repo, folder_path=str(plan.pub.weights),
                          commit_message=f"Upload {plan.pub.kind} with lowtune",
                          ignore_patterns=list(IGNORED) + [".*"])
    except Exception as exc:  # the client raises many types; all end here as one line without the token
        status = _status_of(exc)
        detail = str(exc).replace(token, "***") if token else str(exc)
        raise UserError(_hub_error("ModelScope", plan, status, detail.splitlines()[0] if detail else
                                   type(exc).__name__)) from None
    return f"{plan.endpoint}/models/{plan.repo}"


def _status_of(exc: BaseException) -> int | None:
    """The HTTP status behind an exception, looking through the causes (the client re-wraps its own errors)."""
    seen: BaseException | None = exc
    while seen is not None:
        status = getattr(seen, "status_code", None) or getattr(getattr(seen, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


def _ms_license(plan: UploadPlan) -> str:
    license_name = str(read_front_matter(plan.pub.weights / "README.md").get("license") or "")
    return {"apache-2.0": "Apache License 2.0", "mit": "MIT"}.get(license_name.lower(), "Apache License 2.0")


# --- OpenXLab -----------------------------------------------------------------------------------------------------

def openxlab_metafile(repo: str, files: list[str], pub: Located) -> str:
    """The metafile.yml that `openxlab model create -s` reads: one Models entry per file, weights by path."""
    license_name = "Apache-2.0"
    meta = read_front_matter(pub.weights / "README.md")
    if str(meta.get("license") or "").lower() == "mit":
        license_name = "MIT"
    document: dict[str, Any] = {
        "Collections": [{"Name": repo.split("/")[-1], "License": license_name, "Framework": "[PyTorch]",
                         "Paper": {}, "Code": {"URL": "https://github.com/InternLM/InternLM"}}],
        "Models": [{"Name": name, "Results": [{"Task": "Text Generation", "Dataset": "none"}], "Weights": name}
                   for name in files if name != METAFILE],
    }
    head = ("# OpenXLab model metafile, written by `lowtune upload --to openxlab`.\n"
            "# Collections[0].Code.URL is shown on the model page: point it at your project's repository.\n")
    return head + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000)


def openxlab_steps(plan: UploadPlan) -> str:
    """The exact commands that publish the folder with OpenXLab's own CLI, from a separate environment."""
    folder = plan.pub.weights.resolve()
    private = " --private True" if plan.private else ""
    return "\n".join([
        "OpenXLab's `openxlab` package pins old requests/rich/setuptools, so lowtune does not install it here.",
        f"{METAFILE} is written in {folder}. Publish from a separate environment:",
        "",
        "  python3 -m venv ~/.venvs/openxlab && ~/.venvs/openxlab/bin/pip install -U openxlab",
        "  ~/.venvs/openxlab/bin/openxlab login        # AK/SK from openxlab.org.cn > 账号与安全 > 密钥管理",
        f"  cd {folder}",
        f"  ~/.venvs/openxlab/bin/openxlab model create --model-repo '{plan.repo}' -s ./{METAFILE}{private}",
        "",
        "Later changes: ~/.venvs/openxlab/bin/python -c \"from openxlab.model import upload; "
        f"upload(model_repo='{plan.repo}', file_type='metafile', source='{METAFILE}')\"",
        f"Model page: https://openxlab.org.cn/models/detail/{plan.repo}",
    ])


# --- the command --------------------------------------------------------------------------------------------------

def upload(target: str | Path, to: str, repo: str, private: bool = False, token: str | None = None,
           dry_run: bool = False) -> str:
    """Plan, print, then (unless dry-run) write the card/extra files and publish. Returns the closing line."""
    plan = make_plan(target, to, repo, private)
    print(describe(plan, dry_run), flush=True)
    if dry_run:
        return "dry run: nothing was written or uploaded"
    if to == "openxlab":
        write_generated(plan)
        return openxlab_steps(plan)
    check_hub_ready(plan)
    write_generated(plan)
    where = upload_hf(plan, token) if to == "hf" else upload_modelscope(plan, token)
    return f"uploaded {len(plan.files)} files to {where}"
