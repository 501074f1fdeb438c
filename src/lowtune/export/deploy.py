"""`lowtune deploy`: a runnable Gradio app folder for OpenXLab apps or Hugging Face Spaces.

The folder holds `app.py` (standalone: transformers + gradio, plus peft for an adapter; no lowtune), the chat
template the model was trained with (`chat_template.jinja`) and its stop ids baked into `app.py`,
`requirements.txt`, `packages.txt` where the platform installs system packages from it (OpenXLab: git and git-lfs,
to clone the model repo), and a README with the Spaces front matter (sdk gradio, app_file app.py) and the steps to
point the app at the uploaded model. `python app.py` runs it locally against the model folder it was made from.

Which model the app loads: `$MODEL_ID`, else the constant written at deploy time (`--repo`, else the local
folder). A local folder is used as it is; on OpenXLab a repo id is cloned from code.openxlab.org.cn with git-lfs
(as the tutorial's app did); anywhere else transformers downloads it from the Hugging Face Hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowtune.errors import UserError
from lowtune.export.upload import check_repo_id, locate_publishable
from lowtune.models.resolve import resolve_model_dir
from lowtune.runs import GENERATION_CONFIG, TEMPLATE_FILE, Located, read_stop_ids, staged_dir
from lowtune.templates import STOP_WORDS, ChatTemplate, resolve_template

TARGETS = ("openxlab", "hf-space")
FALLBACK_GRADIO = "6.0.0"


def gradio_version() -> str:
    """The Gradio release installed here (what app.py is written for and tested with), pinned in the bundle."""
    from importlib import metadata

    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        return FALLBACK_GRADIO


@dataclass
class DeployResult:
    out_dir: Path
    model_id: str
    stop_ids: list[int]
    files: list[str]


# --- what the app needs from the model ----------------------------------------------------------------------------

def _tokenizer_dir(pub: Located) -> Path:
    if pub.tokenizer_dir is not None:
        return pub.tokenizer_dir
    if pub.base_spec:
        return resolve_model_dir(pub.base_spec)
    raise UserError(f"{pub.weights} has no tokenizer files and no known base model; copy the tokenizer into it")


def app_template(pub: Located) -> tuple[ChatTemplate, list[int], str | None]:
    """The chat template, every stop id (template stop words, EOS, generation_config.json) and the system prompt."""
    from transformers import AutoTokenizer

    tok_dir = _tokenizer_dir(pub)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    name = pub.config.model.template if pub.config else "auto"
    stop_words = STOP_WORDS.get(name, ())
    if pub.template_path is not None:
        template = ChatTemplate(name=name, source=pub.template_path.read_text(encoding="utf-8"), stop_words=stop_words)
    else:
        template = resolve_template(name, tokenizer, tok_dir, stop_words=stop_words)
    ids = template.stop_token_ids(tokenizer)
    for path in (pub.run.generation_config_path if pub.run else None, pub.weights / GENERATION_CONFIG):
        ids += [i for i in (read_stop_ids(path) if path else []) if i not in ids]
    system = (pub.config.eval.system or pub.config.data.system or None) if pub.config else None
    return template, ids, system


# --- the bundle ---------------------------------------------------------------------------------------------------

def requirements(target: str, adapter: bool) -> str:
    lines = ["torch", "transformers>=4.56", "accelerate", "safetensors", "sentencepiece", "protobuf"]
    if adapter:
        lines.append("peft>=0.13")
    if target == "openxlab":  # a Space installs gradio itself, at the README's sdk_version
        major = int(gradio_version().split(".")[0])
        lines.insert(0, f"gradio>={gradio_version()},<{major + 1}")
    return "\n".join(lines) + "\n"


def readme(title: str, target: str, model_id: str, repo: str | None, pub: Located, stop_ids: list[int]) -> str:
    front = "\n".join(["---", f"title: {title}", "emoji: 💬", "colorFrom: indigo", "colorTo: blue", "sdk: gradio",
                       f"sdk_version: {gradio_version()}", "app_file: app.py", "pinned: false", "---", ""])
    kind = "LoRA adapter" if pub.kind == "adapter" else "model"
    point = repo or "OWNER/NAME"
    lines = [front, f"# {title}", "",
             f"A Gradio chat app for the {kind} `{pub.weights.name}`, made by `lowtune deploy`. It needs only the "
             "packages in `requirements.txt` (no lowtune).", "",
             "## Run it here", "", "```bash", "pip install -r requirements.txt gradio", "python app.py",
             "```", "", f"It loads `{model_id}` (the `MODEL_ID` constant in `app.py`); set `MODEL_ID=...` to "
             "load another folder or repo. Port and address follow `GRADIO_SERVER_PORT` / "
             "`GRADIO_SERVER_NAME` (default 127.0.0.1:7860).", "",
             "## Point it at the uploaded model", ""]
    if target == "hf-space":
        lines += ["```bash", f"lowtune upload {pub.weights} --to hf --repo {point}",
                  f"lowtune deploy {pub.weights} --target hf-space --repo {point} -o app/",
                  "```", "",
                  "Create a Gradio Space, then push this folder to it (`hf upload OWNER/SPACE . --repo-type space`"
                  " or git). The Space downloads the model from the Hub at start; for a private model, add an "
                  "`HF_TOKEN` secret in the Space settings.", ""]
    else:
        lines += ["```bash", f"lowtune upload {pub.weights} --to openxlab --repo {point}   # prints the steps",
                  f"lowtune deploy {pub.weights} --target openxlab --repo {point} -o app/",
                  "```", "",
                  "Put this folder in a GitHub repository, then on openxlab.org.cn create an app: Gradio, that "
                  "repository, hardware by model size (7B in fp16: 8 vCPU / 32 GB / A10 24 GB). At start the app "
                  f"clones `https://code.openxlab.org.cn/{point}.git` with git-lfs (`packages.txt` installs both) "
                  "and loads it from `./model`.", ""]
    if pub.kind == "adapter":
        lines += ["The adapter loads on its base model (from `adapter_config.json`); set `BASE_MODEL` to a folder "
                  "or hub id where the base can be found on the machine that runs the app.", ""]
    lines += [f"Generation stops on token ids {stop_ids} (the training template's end-of-turn and EOS).", ""]
    return "\n".join(lines)


def app_source(model_id: str, target: str, stop_ids: list[int], system: str | None, title: str) -> str:
    constants = (f"MODEL_ID = os.environ.get(\"MODEL_ID\", {json.dumps(model_id)})\n"
                 f"PLATFORM = {json.dumps(target)}\n"
                 f"STOP_IDS = {json.dumps(stop_ids)}\n"
                 f"SYSTEM = {json.dumps(system or '', ensure_ascii=False)}\n"
                 f"TITLE = {json.dumps(title, ensure_ascii=False)}\n")
    return APP_PY.replace("# __CONSTANTS__\n", constants)


def app_title(pub: Located, repo: str | None) -> str:
    """The repo's name, else the run's name for a run's adapter or model, else the folder's name."""
    if repo:
        return repo.split("/")[-1]
    if pub.run and pub.weights.parent.resolve() == pub.run.root.resolve():
        return pub.run.root.resolve().name
    return pub.weights.resolve().name


def deploy(target_dir: str | Path, target: str, out_dir: str | Path, repo: str | None = None,
           force: bool = False) -> DeployResult:
    """Write the app folder for MODEL|ADAPTER|RUN at `out_dir` (all of it appears, or nothing)."""
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)} (got '{target}')")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} already exists and is not empty; choose another -o or add --force")
    pub = locate_publishable(target_dir)
    model_id = check_repo_id(repo) if repo else str(pub.weights.resolve())
    template, stop_ids, system = app_template(pub)
    title = app_title(pub, repo)
    files = {"app.py": app_source(model_id, target, stop_ids, system, title),
             TEMPLATE_FILE: template.source,
             "requirements.txt": requirements(target, pub.kind == "adapter"),
             "README.md": readme(title, target, model_id, repo, pub, stop_ids)}
    if target == "openxlab":
        files["packages.txt"] = "git\ngit-lfs\n"
    with staged_dir(out) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return DeployResult(out, model_id, stop_ids, sorted(files))


APP_PY = '''"""Chat app: Gradio + transformers, streaming, with the model's own chat template and stop ids.

Written by `lowtune deploy`; runs without lowtune. `python app.py` serves it on $GRADIO_SERVER_NAME:$GRADIO_SERVER_PORT
(default 127.0.0.1:7860). MODEL_ID is a local folder, or a repo id: cloned from OpenXLab with git-lfs on OpenXLab,
downloaded from the Hugging Face Hub elsewhere.
"""

import json
import os
import subprocess
from pathlib import Path
from threading import Thread

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

# __CONSTANTS__
HERE = Path(__file__).resolve().parent
TEMPLATE = (HERE / "chat_template.jinja").read_text(encoding="utf-8")


def model_folder(model_id: str) -> str:
    """A local folder as it is; on OpenXLab a repo id is cloned (git-lfs) into ./model; else the id itself."""
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser())
    if PLATFORM == "openxlab":
        target = HERE / "model"
        if not (target / "config.json").is_file() and not (target / "adapter_config.json").is_file():
            subprocess.run(["git", "lfs", "install"], check=True)
            subprocess.run(["git", "clone", f"https://code.openxlab.org.cn/{model_id}.git", str(target)], check=True)
            subprocess.run(["git", "lfs", "pull"], cwd=target, check=True)
        return str(target)
    return model_id


def load(model_id: str):
    folder = model_folder(model_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    adapter_config = Path(folder) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = os.environ.get("BASE_MODEL") or json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, folder)
        has_tokenizer = (Path(folder) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else base)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


MODEL, TOKENIZER = load(MODEL_ID)


def respond(message, history, system, max_new_tokens, temperature, top_p):
    messages = [{"role": "system", "content": system}] if system else []
    for turn in history:
        content = turn["content"] if isinstance(turn, dict) else turn[1]
        if isinstance(turn, dict) and turn.get("role") in ("user", "assistant"):
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            messages.append({"role": turn["role"], "content": str(content)})
    messages.append({"role": "user", "content": message})
    inputs = TOKENIZER.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt").to(MODEL.device)
    streamer = TextIteratorStreamer(TOKENIZER, skip_prompt=True, skip_special_tokens=True, timeout=600)
    sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)} \\
        if temperature > 0 else {"do_sample": False}
    pad = TOKENIZER.pad_token_id if TOKENIZER.pad_token_id is not None else STOP_IDS[0]
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=int(max_new_tokens), eos_token_id=STOP_IDS,
                  pad_token_id=pad, **sampling)
    Thread(target=MODEL.generate, kwargs=kwargs, daemon=True).start()
    answer = ""
    for piece in streamer:
        answer += piece
        yield answer.lstrip()


demo = gr.ChatInterface(
    respond,
    title=TITLE,
    additional_inputs=[
        gr.Textbox(SYSTEM, label="System prompt"),
        gr.Slider(16, 2048, value=512, step=16, label="Max new tokens"),
        gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p"),
    ],
    api_name="chat",
)

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch()
'''
