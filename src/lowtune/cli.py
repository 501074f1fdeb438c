"""`lowtune` command line: argparse wiring, one small function per verb, heavy imports inside the functions.

Top layer. `lowtune --help` must not import torch or transformers (a test checks it).
Exit codes: 0 ok, 2 user error (one line naming the file/key/row and the fix), 1 internal failure.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowtune import __version__
from lowtune.errors import UserError

Handler = Callable[[argparse.Namespace], int | None]


# --- recipes ------------------------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    from lowtune.config import recipe_names, recipe_text

    names = [n for n in recipe_names() if not args.pattern or args.pattern.lower() in n.lower()]
    if not names:
        raise UserError(f"no recipe matches '{args.pattern}'; `lowtune list` shows all")
    width = max(len(n) for n in names)
    for name in names:
        lines = recipe_text(name).splitlines()
        about = next((ln.lstrip("# ").strip() for ln in lines[1:3] if ln.startswith("#")), "")
        print(f"{name:<{width}}  {about}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from lowtune.config import recipe_text

    text = recipe_text(args.recipe)
    dest = Path(args.dest or f"{Path(args.recipe).stem}.yaml")
    if dest.is_dir():
        dest = dest / f"{Path(args.recipe).stem}.yaml"
    if dest.exists() and not args.force:
        raise UserError(f"{dest} already exists; pick another name or add --force")
    dest.write_text(text, encoding="utf-8")
    print(f"wrote {dest}  (train it: lowtune train {dest})")
    return 0


# --- environment --------------------------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from lowtune.doctor import run_doctor

    return run_doctor(timeout=args.timeout)


def cmd_download(args: argparse.Namespace) -> int:
    from lowtune.models.download import download

    folder = download(args.repo_id, hub=args.hub, revision=args.revision, out_dir=args.output,
                      repo_type="dataset" if args.dataset else "model")
    print(f"downloaded {args.repo_id} -> {folder}")
    return 0


# --- training -----------------------------------------------------------------------------------------------------

def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the newest complete checkpoint (auto) or a checkpoint / run folder")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, dataset summary and trainable parameters, then exit")
    p.add_argument("--nproc", type=int, metavar="N", help="train on N processes / GPUs of this machine (torchrun)")


def _late_flags(verb: str, add_flags: Callable[[argparse.ArgumentParser], None],
                rest: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags may also follow the overrides (`train cfg.yaml train.lr=1e-4 --resume auto`): split them off."""
    late_parser = argparse.ArgumentParser(prog=f"lowtune {verb}", add_help=False)
    add_flags(late_parser)
    late, overrides = late_parser.parse_known_args(rest)
    unknown = [item for item in overrides if item.startswith("-")]
    if unknown:
        raise UserError(f"unknown option {unknown[0]} for `lowtune {verb}`; see `lowtune {verb} --help`")
    return late, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from lowtune.config import load_config
    from lowtune.train import train

    late, overrides = _late_flags("train", _train_flags, args.overrides)
    cfg = load_config(args.config, overrides)
    resume, dry_run = late.resume or args.resume, late.dry_run or args.dry_run
    from lowtune.train.launch import in_worker, launch, needs_launch, requested_processes

    nproc = requested_processes(late.nproc or args.nproc)
    if needs_launch(nproc) and not dry_run and not in_worker():
        return launch(nproc, [args.config, *overrides] + (["--resume", resume] if resume else []))
    train(cfg, resume=resume, dry_run=dry_run)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lowtune.config import load_config
    from lowtune.train.estimate import estimate

    late, overrides = _late_flags("estimate", _estimate_flags, args.overrides)
    return estimate(load_config(args.config, overrides), late.gpu_memory or args.gpu_memory,
                    Console(highlight=False))


def _estimate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-memory", type=float, metavar="GiB", help="plan for a GPU of this size (default: this GPU)")


def cmd_plot(args: argparse.Namespace) -> int:
    from lowtune.train.plot import plot_loss

    print(f"wrote {plot_loss(args.run)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowtune.demo import run_demo

    return run_demo(name=args.name, output=args.output)


# --- after training -----------------------------------------------------------------------------------------------

def cmd_merge(args: argparse.Namespace) -> int:
    from lowtune.export.merge import merge

    result = merge(args.target, args.output, base=args.base, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   force=args.force)
    print(f"merged {args.target} -> {result.out_dir} ({result.dtype}, {result.shards} safetensors shard(s), "
          f"stop ids {result.stop_ids}, {result.seconds:.1f}s)")
    print(f"chat with it: lowtune chat {result.out_dir}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lowtune.infer.chat import make_sampling, run_chat
    from lowtune.infer.engine import load_engine

    sampling = make_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                             args.seed)
    print(f"loading {args.target} ...", file=sys.stderr, flush=True)
    if args.agent and args.compare:
        raise UserError("--agent and --compare do not go together; pick one")
    engine = load_engine(args.target, adapter=args.adapter, bits=args.bits, template=args.template,
                         system=args.system, base=args.base, trust_remote_code=args.trust_remote_code)
    if args.agent:
        from lowtune.infer.agent import run_agent_chat
        from lowtune.infer.tools import default_tools

        tools = default_tools(serper_url=args.serper_url, python_timeout=args.python_timeout)
        if "web_search" not in {tool.name for tool in tools}:
            print("note: SERPER_API_KEY is not set, so web search is off (get a key at serper.dev)", file=sys.stderr)
        return run_agent_chat(engine, sampling, tools, prompt=args.prompt, max_steps=args.max_steps)
    return run_chat(engine, sampling, prompt=args.prompt, compare=args.compare)


def cmd_eval(args: argparse.Namespace) -> int:
    from lowtune.infer.chat import make_sampling
    from lowtune.infer.engine import load_engine
    from lowtune.infer.evaluate import eval_output_path, evaluate, show_report, write_report

    path = eval_output_path(args.target, args.output)
    print(f"loading {args.target} ...", file=sys.stderr, flush=True)
    engine = load_engine(args.target, adapter=args.adapter, bits=args.bits, template=args.template,
                         system=args.system)
    report = evaluate(engine, args.data, args.n, make_sampling(args.max_new_tokens), args.max_length,
                      with_base=not args.no_base, identity=args.identity, retention=args.retention)
    write_report(report, path)
    show_report(report, path, shown=args.show)
    return 0


def _engine_for(args: argparse.Namespace):
    from lowtune.infer.engine import load_engine

    print(f"loading {args.target} ...", file=sys.stderr, flush=True)
    return load_engine(args.target, template=args.template, system=args.system,
                       trust_remote_code=args.trust_remote_code)


def cmd_web(args: argparse.Namespace) -> int:
    from lowtune.infer.serve import check_port
    from lowtune.infer.web import resolve_address, run_web

    host, port = resolve_address(args.host, args.port)
    check_port(host, port)  # before the model loads
    check_request_timeout(args.request_timeout)
    run_web(_engine_for(args), host, port, args.request_timeout)
    return 0


def check_request_timeout(seconds: float) -> None:
    if not seconds > 0:
        raise UserError(f"--request-timeout {seconds:g} must be more than 0 seconds")


def cmd_serve(args: argparse.Namespace) -> int:
    from lowtune.infer.serve import Limits, check_port, resolve_api_key, serve

    key = resolve_api_key(args.api_key)
    check_port(args.host, args.port)
    check_request_timeout(args.request_timeout)
    serve(_engine_for(args), host=args.host, port=args.port, api_key=key,
          limits=Limits(request_seconds=args.request_timeout))
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from lowtune.export.upload import upload

    print(upload(args.dir, args.to, args.repo, private=args.private, token=args.token, dry_run=args.dry_run))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from lowtune.export.deploy import deploy

    result = deploy(args.dir, args.target, args.output, repo=args.repo, force=args.force)
    print(f"wrote {result.out_dir}/: {', '.join(result.files)} (model {result.model_id}, stop ids {result.stop_ids})")
    print(f"run it here: cd {result.out_dir} && python app.py   (README.md says how to publish it)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lowtune.export.gguf import export

    result = export(args.target, fmt=args.format, quant=args.quant, out_dir=args.output, force=args.force)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"exported {args.target} -> {result.gguf} ({result.quant}, chat template {result.template_name}, "
          f"stop ids {result.stop_ids}, {result.seconds:.1f}s)")
    if result.modelfile is not None:
        print(f"run it in Ollama: ollama create {result.ollama_name} -f {result.modelfile} && "
              f"ollama run {result.ollama_name}")
    else:
        print(f"run it: llama-cli -m {result.gguf} -cnv   (llama.cpp; LM Studio opens the file too)")
    return 0


# --- data ---------------------------------------------------------------------------------------------------------

def cmd_data_convert(args: argparse.Namespace) -> int:
    from lowtune.data.convert import convert_file, parse_mapping

    report = convert_file(Path(args.src), Path(args.output), args.format, args.sheet, parse_mapping(args.map),
                          args.system, args.strict)
    print(report.describe())
    print(f"wrote {args.output} ({report.converted} {report.unit})")
    return 0


def cmd_data_identity(args: argparse.Namespace) -> int:
    from lowtune.data.formats import write_jsonl
    from lowtune.data.identity import identity_conversations, mix_general

    if (args.mix is None) != (args.ratio is None):
        raise UserError("--mix FILE and --ratio R go together (e.g. --mix data/general.jsonl --ratio 0.2)")
    conversations = identity_conversations(args.name, args.author, args.lang, args.repeat, args.seed)
    note = ""
    if args.mix:
        conversations, kept = mix_general(conversations, Path(args.mix), args.ratio, args.seed)
        note = f" ({kept} identity + {len(conversations) - kept} from {args.mix})"
    count = write_jsonl(Path(args.output), conversations)
    print(f"wrote {args.output}: {count} conversations{note}")
    if not args.mix:
        print("train it with data.replay (the shipped *-self recipes set it), so that the model keeps what it knew: "
              "identity data alone teaches it to answer every question with its name")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from lowtune.data.split import split_file

    train_path, test_path, n_train, n_test = split_file(Path(args.input), args.train, args.seed)
    print(f"wrote {train_path} ({n_train}) and {test_path} ({n_test}); train = floor(n × {args.train}), seed {args.seed}")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from lowtune.data.formats import ReadReport
    from lowtune.data.preview import collect, header, load_tokenizer_and_template, plain_text, plan_preview

    plan = plan_preview(args.source, args.model, args.template, args.max_length)
    tokenizer, template = load_tokenizer_and_template(plan.model, plan.template)
    report = ReadReport()
    shown, stats = collect(plan.paths, tokenizer, template, args.n, plan.max_length, plan.fmt, plan.system, report)
    color = sys.stdout.isatty() and not args.no_color
    if color:
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False)
    for number, sample in enumerate(shown, 1):
        print(header(sample, number, plan.max_length))
        if color:
            console.print(Text.assemble(*((t, "bold green" if trained else "") for t, trained in sample.pieces)))
        else:
            print(plain_text(sample))
    print(f"── template {template.name}, model {plan.model}; trained spans "
          + ("in green" if color else "between ⟦ ⟧"))
    print(stats.describe(plan.max_length))
    if report.skipped or report.notes:
        print(report.describe())
    if plan.note:
        print(f"note: {plan.note}")
    return 0


# --- wiring -------------------------------------------------------------------------------------------------------

def _add_verb(subparsers: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowtune", description="Low-cost fine-tuning of chat LLMs, from dataset to deployed model.")
    parser.add_argument("--version", action="version", version=f"lowtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def verb(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        return _add_verb(sub, name, handler, help_text)

    p = verb("doctor", cmd_doctor, "versions, GPU/VRAM/bf16, 4-bit self-test, hub reachability, offline state")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per hub reachability check (default 3)")

    p = verb("download", cmd_download, "fetch a model (or --dataset) from Hugging Face or ModelScope; resumes")
    p.add_argument("repo_id", metavar="ID", help="hub id, e.g. Shanghai_AI_Laboratory/internlm-chat-7b")
    p.add_argument("--hub", choices=["auto", "hf", "modelscope"], default="auto",
                   help="auto (default) tries the reachable hubs, Hugging Face first")
    p.add_argument("--revision", help="branch, tag or commit (e.g. v1.0.3)")
    p.add_argument("-o", "--output", metavar="DIR", help="folder to fill (default: the hub client's cache)")
    p.add_argument("--dataset", action="store_true", help="ID names a dataset repo")

    p = verb("list", cmd_list, "list the recipes shipped with lowtune")
    p.add_argument("pattern", nargs="?", help="only names containing this text")

    p = verb("copy", cmd_copy, "copy a shipped recipe to an editable YAML file")
    p.add_argument("recipe")
    p.add_argument("dest", nargs="?", help="file or folder (default ./RECIPE.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    p = verb("train", cmd_train, "fine-tune (QLoRA / LoRA / full) as a config says; writes a run folder")
    p.add_argument("config", metavar="CONFIG", help="YAML file or shipped recipe name (see `lowtune list`)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=1e-4")
    _train_flags(p)

    p = verb("estimate", cmd_estimate, "forecast peak GPU memory and time for a config; shows the plan train picks")
    p.add_argument("config", metavar="CONFIG", help="YAML file or shipped recipe name")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="config overrides, e.g. data.max_length=1024")
    _estimate_flags(p)

    p = verb("plot", cmd_plot, "draw a run's loss curve into RUN/loss.png")
    p.add_argument("run", metavar="RUN", help="run folder")

    p = verb("demo", cmd_demo, "tiny in-process model learns its identity on CPU, then answers (no download)")
    p.add_argument("--name", default=None, help="the name the model learns (default 小明)")
    p.add_argument("-o", "--output", default="runs/demo", metavar="DIR", help="run folder (default runs/demo)")

    p = verb("merge", cmd_merge, "merge a LoRA/QLoRA adapter into a full-precision copy of its base (HF folder)")
    p.add_argument("target", metavar="RUN|ADAPTER", help="run folder or PEFT adapter folder")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the merged model")
    p.add_argument("--base", metavar="PATH", help="base model (default: from the run's config or adapter_config.json)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights dtype (default: as the base is stored)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    p = verb("chat", cmd_chat, "chat in the terminal with a run, adapter or model (streaming, multi-turn)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code (only for families lowtune cannot load natively)")
    p.add_argument("target", metavar="MODEL|RUN",
                   help="run folder, adapter folder, model folder, hub id or builtin:tiny")
    p.add_argument("--adapter", metavar="PATH", help="PEFT adapter to put on MODEL")
    p.add_argument("--base", metavar="PATH", help="base model for a run or adapter whose recorded base moved")
    p.add_argument("--template", help="chat template name or .jinja file (default: the run's / the model's)")
    p.add_argument("--system", help="system prompt (default: the run's eval.system / data.system)")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the base in 4-bit (NF4) or 8-bit")
    p.add_argument("--prompt", metavar="TEXT", help="answer TEXT once and exit (no REPL)")
    p.add_argument("--compare", action="store_true", help="show base and fine-tuned answers side by side")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, deterministic (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="default 1.0 = off")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--agent", action="store_true",
                   help="ReAct agent (MS-Agent format) with web search (SERPER_API_KEY), Python and a calculator")
    p.add_argument("--max-steps", type=int, default=5, help="agent: tool calls per question (default 5)")
    p.add_argument("--serper-url", metavar="URL", help="agent: search API base URL (default $LOWTUNE_SERPER_URL "
                                                        "or https://google.serper.dev)")
    p.add_argument("--python-timeout", type=float, default=10.0, help="agent: seconds per Python run (default 10)")

    p = verb("eval", cmd_eval, "tuned vs base: loss, ROUGE-L / BLEU-4, identity hit rate, retention (RUN/eval.json)")
    p.add_argument("target", metavar="RUN", help="run folder (or a model folder with -o)")
    p.add_argument("--data", metavar="FILE", help="test split, any supported data format: loss, ROUGE-L, BLEU-4; "
                                                  "preference pairs: reward accuracy")
    p.add_argument("--identity", metavar="NAME", help="share of held-out identity questions answered with NAME")
    p.add_argument("--retention", action="store_true",
                   help="share of the base model's correct answers to built-in factual questions that the tuned "
                        "model keeps")
    p.add_argument("-n", type=int, default=50, help="test questions answered and scored (default 50)")
    p.add_argument("--show", type=int, default=5, help="sample answers shown beside their references (default 5)")
    p.add_argument("-o", "--output", metavar="FILE", help="report file (default RUN/eval.json)")
    p.add_argument("--adapter", metavar="PATH", help="PEFT adapter to put on the model")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load the base in 4-bit (NF4) or 8-bit")
    p.add_argument("--template", help="chat template override")
    p.add_argument("--system", help="system prompt for conversations without one (default: the run's)")
    p.add_argument("--max-length", type=int, help="truncate conversations (default: the run's data.max_length)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="sample answer length limit (default 256)")
    p.add_argument("--no-base", action="store_true", help="skip the base model's loss and answers")

    p = verb("web", cmd_web, "browser chat (Gradio) with system prompt and sampling controls; local only")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code (only for families lowtune cannot load natively)")
    p.add_argument("target", metavar="MODEL|RUN", help="run folder, adapter folder, model folder, hub id or builtin:NAME")
    p.add_argument("--host", help="address to listen on (default $GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default $GRADIO_SERVER_PORT or 6006)")
    p.add_argument("--request-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a request's head, and again its body (default 10)")
    p.add_argument("--template", help="chat template name or .jinja file (default: the run's / the model's)")
    p.add_argument("--system", help="default system prompt (editable on the page)")

    p = verb("serve", cmd_serve, "OpenAI-compatible HTTP API: /v1/chat/completions (streaming too), /v1/models")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code (only for families lowtune cannot load natively)")
    p.add_argument("target", metavar="MODEL|RUN", help="run folder, adapter folder, model folder, hub id or builtin:NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--request-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a request's head, and again its body (default 10)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default $LOWTUNE_API_KEY; none when unset)")
    p.add_argument("--template", help="chat template name or .jinja file (default: the run's / the model's)")
    p.add_argument("--system", help="system prompt used when a request has none")

    p = verb("upload", cmd_upload, "publish a model, adapter or run to Hugging Face, ModelScope or OpenXLab")
    p.add_argument("dir", metavar="DIR", help="model folder, adapter folder or run folder (its adapter)")
    p.add_argument("--to", required=True, choices=["hf", "modelscope", "openxlab"], help="which hub")
    p.add_argument("--repo", required=True, metavar="ID", help="repository id, owner/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="access token (default: $HF_TOKEN / $MODELSCOPE_API_TOKEN or the saved login)")
    p.add_argument("--dry-run", action="store_true", help="list every file, its size and where it would go; "
                                                          "upload and write nothing")

    p = verb("deploy", cmd_deploy, "a runnable Gradio app folder for OpenXLab or a Hugging Face Space")
    p.add_argument("dir", metavar="MODEL|RUN", help="model folder, adapter folder or run folder")
    p.add_argument("--target", required=True, choices=["openxlab", "hf-space"], help="where the app will run")
    p.add_argument("-o", "--output", required=True, metavar="APPDIR", help="folder to write the app into")
    p.add_argument("--repo", metavar="ID", help="hub repo the app loads (default: this local folder)")
    p.add_argument("--force", action="store_true", help="replace a non-empty APPDIR")

    p = verb("export", cmd_export, "a GGUF file for llama.cpp / LM Studio, or GGUF + Modelfile for Ollama")
    p.add_argument("target", metavar="RUN|MODEL", help="run folder (merged first), adapter folder, model folder, "
                                                       ".gguf file or builtin:NAME")
    p.add_argument("--format", choices=["gguf", "ollama"], default="gguf",
                   help="gguf: the file alone; ollama: the file + a Modelfile (default gguf)")
    p.add_argument("--quant", default="f16", metavar="TYPE",
                   help="f16 (default), bf16, f32, q8_0; q4_k_m and other k-quants with llama-cpp-python "
                        "(pip install 'lowtune[gguf-quant]')")
    p.add_argument("-o", "--output", metavar="DIR", help="folder to write (default exports/NAME)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    data = sub.add_parser("data", help="datasets: convert, identity, split, preview",
                          description="datasets: convert any format to canonical JSONL, make self-cognition data, "
                                      "split, preview what trains")
    data.set_defaults(handler=lambda _: data.print_help())
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    def data_verb(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        return _add_verb(data_sub, name, handler, help_text)

    d = data_verb("convert", cmd_data_convert, "any supported source -> canonical messages (or pairs) JSONL")
    d.add_argument("src", metavar="SRC", help="JSON/JSONL file, .txt, .xlsx/.csv, or a saved dataset folder")
    d.add_argument("-o", "--output", required=True, metavar="OUT", help="JSONL file to write")
    d.add_argument("--format", default="auto",
                   choices=["auto", "xtuner", "messages", "alpaca", "sharegpt", "guanaco", "msagent", "text",
                            "pairs", "ultrafeedback", "hh-rlhf", "sharegpt-pairs"],
                   help="input layout (default: detected per record); the last four are preference pairs, written "
                        'as {"prompt", "chosen", "rejected"} lines')
    d.add_argument("--sheet", help="spreadsheet sheet name (default: the first sheet)")
    d.add_argument("--map", nargs="+", metavar="KEY=COL",
                   help="spreadsheet columns: input=COL output=COL [system=COL]; COL = header or letter (A, D)")
    d.add_argument("--system", help="system prompt for conversations that have none")
    d.add_argument("--strict", action="store_true", help="stop with an error at the first unconvertible record")

    d = data_verb("identity", cmd_data_identity, "self-cognition data: paraphrased questions and answers")
    d.add_argument("--name", required=True, help="the name the model should give itself")
    d.add_argument("--author", help="who made it (answers mention them)")
    d.add_argument("--lang", choices=["zh", "en", "both"], default="zh", help="language of the data (default zh)")
    d.add_argument("--repeat", type=int, default=5, help="times each question appears, with varied answers (default 5)")
    d.add_argument("--mix", metavar="FILE", help="general conversations to mix in against over-fitting")
    d.add_argument("--ratio", type=float, metavar="R", help="share of identity conversations with --mix, e.g. 0.2")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("-o", "--output", required=True, metavar="OUT", help="JSONL file to write")

    d = data_verb("split", cmd_data_split, "write <stem>.train.jsonl and <stem>.test.jsonl next to IN")
    d.add_argument("input", metavar="IN", help="dataset file")
    d.add_argument("--train", type=float, required=True, metavar="FRAC", help="share for training, e.g. 0.7")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    d = data_verb("preview", cmd_data_preview, "rendered samples with trained spans marked, and length statistics")
    d.add_argument("source", metavar="FILE|CONFIG", help="dataset file, config YAML or recipe name")
    d.add_argument("-n", type=int, default=2, help="conversations to show (default 2; each side of a preference "
                                                   "pair counts as one)")
    d.add_argument("--max-length", type=int, metavar="L", help="truncation length to check (default: config's / 2048)")
    d.add_argument("--model", metavar="M", help="tokenizer source: folder, hub id or builtin:tiny (default: "
                                                "the config's model, else builtin:tiny)")
    d.add_argument("--template", metavar="T", help="chat template name or .jinja file (default auto)")
    d.add_argument("--no-color", action="store_true", help="markers instead of colour even on a terminal")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(exc)
        print(f"error: no space left on the disk{f' writing {exc.filename}' if exc.filename else ''}: free some "
              "space and run the command again (unfinished outputs were removed; finished ones are intact)",
              file=sys.stderr)
        return 2
    except Exception as exc:  # a bug in lowtune or a library: keep the traceback for the report
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    import traceback

    traceback.print_exception(exc)
    print(f"internal error: {type(exc).__name__}: {exc} (please report it with `lowtune doctor` output)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
