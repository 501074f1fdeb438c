"""Shipped chat templates against XTuner v0.1.23's PROMPT_TEMPLATE table (restated below), and pinned ids + label masks on tokenizers
that carry the real special tokens at their real ids (InternLM v1, InternLM2, Qwen chatml)."""

from __future__ import annotations

import pytest

from lowtune.data.encode import IGNORE_INDEX, encode_conversation
from lowtune.errors import UserError
from lowtune.templates import ChatTemplate, resolve_template, shipped, shipped_names

SYS, Q1, A1, Q2, A2 = "Be kind.", "Hi?", "Hello!", "Dose?", "Two pills."
TWO_TURNS = [{"role": "system", "content": SYS}, {"role": "user", "content": Q1},
             {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
             {"role": "assistant", "content": A2}]

L2 = ("[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
      "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
      "or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n"
      "{system}\n<</SYS>>\n [/INST] ")
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. {system}\n ")
DSC = ("You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeekCompany, and "
       "you only answer questions related to computer science. For politically sensitive questions, security and "
       "privacy issues, and other non-computer science questions, you will refuse to answer. {system}\n")
CHATML_SYS, CHATML_INST = ("<|im_start|>system\n{system}<|im_end|>\n",
                           "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n")
# XTuner v0.1.23 xtuner/utils/templates.py: SYSTEM, INSTRUCTION, SUFFIX, SUFFIX_AS_EOS, SEP
XTUNER = {
    "default": ("<|System|>:{system}\n", "<|User|>:{input}\n<|Bot|>:", "", False, "\n"),
    "zephyr": ("<|system|>\n{system}\n", "<|user|>\n{input}\n<|assistant|>\n", "", False, "\n"),
    "internlm_chat": ("<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:", "<eoa>", True, "\n"),
    "internlm2_chat": (CHATML_SYS, CHATML_INST, "<|im_end|>", True, "\n"),
    "moss_sft": ("{system}\n", "<|Human|>: {input}<eoh>\n", "", False, "\n"),
    "llama2_chat": (L2, "[INST] {input} [/INST]", "", False, "\n"),
    "code_llama_chat": ("{system}\n", "[INST] {input} [/INST]", "", False, ""),
    "chatglm2": ("{system}\n", "[Round {round}]\n\n问：{input}\n\n答：", "", False, "\n\n"),
    "chatglm3": ("<|system|>\n{system}", "<|user|>\n{input}<|assistant|>\n", "", False, "\n"),
    "qwen_chat": (CHATML_SYS, CHATML_INST, "<|im_end|>", True, "\n"),
    "baichuan_chat": ("{system}\n", "<reserved_102>{input}<reserved_103>", "", False, "\n"),
    "baichuan2_chat": ("{system}\n", "<reserved_106>{input}<reserved_107>", "", False, "\n"),
    "wizardlm": (VICUNA, "USER: {input} ASSISTANT:", "", False, "\n"),
    "vicuna": (VICUNA, "USER: {input} ASSISTANT:", "", False, "\n"),
    "wizardcoder": ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n{system}\n ", "### Instruction:\n{input}\n\n### Response:", "", False, "\n\n"),
    "deepseek_coder": (DSC, "### Instruction:\n{input}\n### Response:\n", "", False, "\n"),
    "deepseek_moe": ("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "", False, "\n"),
    "mistral": ("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "", False, "\n"),
    "mixtral": ("[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "", False, "\n"),
    "deepseek_v2": ("{system}\n\n", "User: {input}\n\nAssistant: ", "<｜end▁of▁sentence｜>", True, ""),
    "gemma": ("<start_of_turn>system\n{system}<end_of_turn>\n",
              "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>", False, "\n"),
    "cohere_chat": ("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
                    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
                    "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>", True, ""),
    "llama3_chat": ("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                    "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|><|start_header_id|>assistant"
                    "<|end_header_id|>\n\n", "<|eot_id|>", True, ""),
    "phi3_chat": ("<|system|>\n{system}<|end|>\n", "<|user|>\n{input}<|end|>\n<|assistant|>\n", "<|end|>", True, "\n"),
}
GLM_BOS = "[gMASK]sop"  # XTuner hard-codes ChatGLM's BOS ids [64790, 64792]


def build_tokenizer(vocab_size: int, specials: dict[str, int], bos: str | None, eos: str):
    """A char-level BPE tokenizer with byte fallback (<0x0A> = 13, as in Llama/InternLM) and specials at fixed ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({chr(c): 259 + c - 32 for c in range(32, 127)})
    vocab.update(specials)
    taken = set(vocab.values())
    free = (i for i in range(vocab_size) if i not in taken)
    for i in range(vocab_size - len(vocab)):
        vocab[f"<unused_{i}>"] = next(free)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token=eos,
                                   additional_special_tokens=[s for s in specials if s not in (bos, eos)])
    return fast


def chars(text: str) -> list[int]:
    """Ids of plain text in build_tokenizer's vocabulary ('\\n' falls back to byte token 13)."""
    return [13 if c == "\n" else 259 + ord(c) - 32 for c in text]


@pytest.fixture(scope="module")
def internlm_tok():
    return build_tokenizer(103168, {"<s>": 1, "</s>": 2, "<eoh>": 103027, "<eoa>": 103028}, "<s>", "</s>")


@pytest.fixture(scope="module")
def internlm2_tok():
    return build_tokenizer(92544, {"<s>": 1, "</s>": 2, "<|action_start|>": 92541, "<|im_end|>": 92542,
                                   "<|im_start|>": 92543}, "<s>", "</s>")


@pytest.fixture(scope="module")
def qwen_tok():
    return build_tokenizer(151646, {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
                           None, "<|endoftext|>")


def xtuner_render(name: str, bos: str, eos: str) -> tuple[str, list[str]]:
    """XTuner's encode_fn layout (v0.1.12+) as text, and the trained pieces: BOS at the start and after a turn that
    ended with EOS; [output + SUFFIX (+ EOS unless SUFFIX_AS_EOS)] trained; SEP after every turn."""
    system, instruction, suffix, suffix_as_eos, sep = XTUNER[name]
    need_eos = not (suffix and suffix_as_eos)
    bos = GLM_BOS if name.startswith("chatglm") else bos
    text, trained = "", []
    for n, (q, a) in enumerate(((Q1, A1), (Q2, A2)), 1):
        if n == 1 or need_eos:
            text += bos
        if n == 1:
            text += system.format(system=SYS)
        text += instruction.format(input=q, round=n)
        piece = a + suffix + (eos if need_eos else "")
        trained.append(piece)
        text += piece + sep
    return text, trained


def test_every_xtuner_template_is_shipped():
    assert set(XTUNER) - {"wizardlm"} <= set(shipped_names())
    assert shipped("deepseekcoder").name == "deepseek_coder"


@pytest.mark.parametrize("name", sorted(XTUNER))
def test_template_renders_xtuner_strings_and_trains_its_spans(name, internlm_tok):
    template = shipped(name)
    expected, trained = xtuner_render(name, "<s>", "</s>")
    assert template.render(TWO_TURNS, internlm_tok) == expected
    segments = template.segments(TWO_TURNS, internlm_tok)
    assert "".join(text for text, _ in segments) == expected
    assert [text for text, index in segments if index is not None] == trained
    assert [index for _, index in segments if index is not None] == [2, 4]


def test_chatglm2_numbers_rounds_and_minicpm_has_no_system(internlm_tok):
    prompt = shipped("chatglm2").render(TWO_TURNS[1:4], internlm_tok, add_generation_prompt=True)
    assert prompt.endswith("[Round 2]\n\n问：Dose?\n\n答：")
    assert shipped("minicpm").render(TWO_TURNS[1:], internlm_tok) == \
        "<s><用户> Hi? <AI>Hello!</s>\n<s><用户> Dose? <AI>Two pills.</s>\n"
    with pytest.raises(UserError, match="minicpm"):
        shipped("minicpm").render(TWO_TURNS, internlm_tok)


def test_stop_words_resolve_to_the_real_ids(internlm_tok, internlm2_tok, qwen_tok):
    assert shipped("internlm_chat").stop_token_ids(internlm_tok) == [103028, 2]
    assert shipped("internlm2_chat").stop_token_ids(internlm2_tok) == [92542, 2]
    assert shipped("qwen_chat").stop_token_ids(qwen_tok) == [151645, 151643]


def labelled(sample: dict) -> list[tuple[int, bool]]:
    return [(tid, label != IGNORE_INDEX) for tid, label in zip(sample["input_ids"], sample["labels"])]


def expect(*pieces: tuple[list[int], bool]) -> list[tuple[int, bool]]:
    return [(tid, trained) for ids, trained in pieces for tid in ids]


def test_internlm_v1_ids_and_mask(internlm_tok):
    sample = encode_conversation(TWO_TURNS, internlm_tok, shipped("internlm_chat"), None)
    assert labelled(sample) == expect(
        ([1], False), (chars(f"<|System|>:{SYS}\n<|User|>:{Q1}"), False), ([103027], False),
        (chars("\n<|Bot|>:"), False), (chars(A1) + [103028], True),
        (chars(f"\n<|User|>:{Q2}"), False), ([103027], False), (chars("\n<|Bot|>:"), False),
        (chars(A2) + [103028], True), ([13], False))
    # the same, literally: <s> <|System|>:Be kind.\n<|User|>:Hi? <eoh> \n<|Bot|>: [Hello! <eoa>] \n ...
    assert sample["input_ids"][:51] == [
        1, 287, 351, 310, 348, 342, 343, 328, 336, 351, 289, 285, 293, 328, 259, 334, 332, 337, 327, 273, 13, 287, 351,
        312, 342, 328, 341, 351, 289, 285, 299, 332, 290, 103027, 13, 287, 351, 293, 338, 343, 351, 289, 285, 299,
        328, 335, 335, 338, 260, 103028, 13]
    assert sample["labels"][43:51] == [299, 328, 335, 335, 338, 260, 103028, -100]
    assert set(sample["labels"][:43]) == {IGNORE_INDEX}


def test_internlm2_ids_and_mask(internlm2_tok):
    sample = encode_conversation(TWO_TURNS, internlm2_tok, shipped("internlm2_chat"), None)
    assert labelled(sample) == expect(
        ([1, 92543], False), (chars(f"system\n{SYS}"), False), ([92542], False), (chars("\n"), False),
        ([92543], False), (chars(f"user\n{Q1}"), False), ([92542], False), (chars("\n"), False),
        ([92543], False), (chars("assistant\n"), False), (chars(A1) + [92542], True), (chars("\n"), False),
        ([92543], False), (chars(f"user\n{Q2}"), False), ([92542], False), (chars("\n"), False),
        ([92543], False), (chars("assistant\n"), False), (chars(A2) + [92542], True), (chars("\n"), False))


def test_qwen_chatml_ids_and_mask(qwen_tok):
    for name in ("qwen_chat", "chatml"):
        sample = encode_conversation(TWO_TURNS, qwen_tok, shipped(name), None)
        assert labelled(sample) == expect(
            ([151644], False), (chars(f"system\n{SYS}"), False), ([151645], False), (chars("\n"), False),
            ([151644], False), (chars(f"user\n{Q1}"), False), ([151645], False), (chars("\n"), False),
            ([151644], False), (chars("assistant\n"), False), (chars(A1) + [151645], True), (chars("\n"), False),
            ([151644], False), (chars(f"user\n{Q2}"), False), ([151645], False), (chars("\n"), False),
            ([151644], False), (chars("assistant\n"), False), (chars(A2) + [151645], True), (chars("\n"), False))


@pytest.mark.parametrize("name", ["internlm_chat", "internlm2_chat", "qwen_chat"])
def test_segment_ids_equal_whole_string_ids_where_specials_bound_the_segments(name, request):
    tok = request.getfixturevalue({"internlm_chat": "internlm_tok", "internlm2_chat": "internlm2_tok",
                                   "qwen_chat": "qwen_tok"}[name])
    template = shipped(name)
    sample = encode_conversation(TWO_TURNS, tok, template, None)
    assert sample["input_ids"] == tok(template.render(TWO_TURNS, tok), add_special_tokens=False)["input_ids"]
    prompt = template.encode_prompt(TWO_TURNS[:4], tok)
    assert sample["input_ids"][: len(prompt)] == prompt


def test_resolve_template_auto_prefers_the_family_then_the_tokenizer(tmp_path, internlm_tok, micro_tokenizer):
    (tmp_path / "config.json").write_text('{"model_type": "internlm"}', encoding="utf-8")
    assert resolve_template("auto", internlm_tok, tmp_path).name == "internlm_chat"
    assert resolve_template("auto", micro_tokenizer).name == "tokenizer"
    assert resolve_template("auto", internlm_tok).name == "default"
    custom = tmp_path / "mine.jinja"
    custom.write_text(shipped("zephyr").source, encoding="utf-8")
    assert resolve_template(str(custom), internlm_tok, stop_words=("</s>",)).stop_words == ("</s>",)
    with pytest.raises(UserError, match="did you mean 'internlm_chat'"):
        resolve_template("internlm_chta", internlm_tok)


def test_template_marking_too_few_spans_is_refused(internlm_tok):
    once = ChatTemplate("once", "{% for m in messages %}{% if loop.last %}{% generation %}{{ m['content'] }}"
                                "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(UserError, match="marks 1"):
        once.segments(TWO_TURNS, internlm_tok)
