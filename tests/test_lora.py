"""LoRA task on the host with the tiny random Qwen3: data formats, prompt masking, training,
adapter files, inference with the adapter, merge into a loadable model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import StaticFiles, closed_port_url, serve


from selfllm_runtime.finetune.data import (DEFAULT_DATA, IGNORE_INDEX, ChatTokenizer, DataError,  # noqa: E402
                                           DataSourceError, default_data, encode_files, read_records,
                                           record_to_messages, write_sample_data)
from selfllm_runtime.finetune.lora import (RUN_INFO, fetch_data, infer, merge, prepare_data,  # noqa: E402
                                           thinking_kwargs, train)
from selfllm_runtime.settings import LoraSettings  # noqa: E402

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "qwen3" / "lora"


@pytest.fixture(scope="session")
def context(tiny_recipe):
    return tiny_recipe("qwen3/lora")[0]


@pytest.fixture(scope="session")
def tiny_model(tiny_recipe) -> Path:
    return tiny_recipe("qwen3/lora")[1]


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture()
def chat(context, tokenizer) -> ChatTokenizer:
    return ChatTokenizer(tokenizer, thinking_kwargs(context, False), context.family.special_tokens.eos, 512)


def test_both_formats_detected_per_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"instruction": "你是谁？", "input": "", "output": "我是甄嬛。"}, ensure_ascii=False) + "\n\n"
                    + json.dumps({"conversation": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]}) + "\n")
    records = read_records(path)
    assert len(records) == 2
    first = record_to_messages(records[0], path, 0, system_prompt="现在你要扮演皇帝身边的女人--甄嬛")
    assert [m["role"] for m in first] == ["system", "user", "assistant"] and first[1]["content"] == "你是谁？"
    second = record_to_messages(records[1], path, 1)
    assert [m["role"] for m in second] == ["user", "assistant"]


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "x"}, "unknown format"),
    ({"instruction": "q", "output": 3}, "'output' must be a string"),
    ({"conversation": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"conversation": [{"role": "robot", "content": "q"}]}, "role 'robot'"),
    ("text", "expected an object"),
])
def test_bad_record_names_file_and_index(tmp_path, record, problem):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}, record]))
    with pytest.raises(DataError) as caught:
        record_to_messages(read_records(path)[1], path, 1)
    assert str(path) in str(caught.value) and "record 1" in str(caught.value) and problem in str(caught.value)


def test_invalid_json_line_is_reported(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"record 1: line 2 is not valid JSON"):
        read_records(path)


def test_prompt_masked_and_end_of_turn_learned(chat, tokenizer, context):
    messages = [{"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
                {"role": "user", "content": "你是谁？"}]
    encoded = chat.encode(messages, {"role": "assistant", "content": "我是甄嬛。"})
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels) == len(encoded["attention_mask"])
    learned = [t for t in labels if t != IGNORE_INDEX]
    first_learned = labels.index(learned[0])
    assert all(label == IGNORE_INDEX for label in labels[:first_learned])
    prompt_text = tokenizer.decode(ids[:first_learned])
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert "你是谁？" in prompt_text
    im_end = tokenizer.convert_tokens_to_ids(context.family.special_tokens.eos)
    assert learned[-1] == im_end and labels[-1] == im_end
    assert tokenizer.decode(learned) == "我是甄嬛。<|im_end|>"


def test_multi_turn_gives_one_example_per_reply_and_truncates(tmp_path, chat):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([{"conversation": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]))
    data = encode_files([path], chat)
    assert len(data.examples) == 2 and data.records == 1
    chat.max_length = 12  # shorter than the prompt: nothing left to learn, so the example is skipped
    with pytest.raises(DataError, match="no trainable example"):
        encode_files([path], chat)


def test_settings_precedence(context):
    settings = context.settings(LoraSettings, cli={"lora_r": None, "r": 4}, env={
        "LORA_R": "16", "LORA_ALPHA": "64", "LORA_TARGET_MODULES": "q_proj, v_proj"})
    assert (settings.r, settings.alpha, settings.target_modules) == (4, 64, ["q_proj", "v_proj"])
    assert settings.dropout == context.family.lora.dropout
    assert settings.system_prompt == "现在你要扮演皇帝身边的女人--甄嬛"  # recipe default goes with default data
    assert context.settings(LoraSettings, env={"DATA_PATH": "/x.json"}).system_prompt is None
    assert context.settings(LoraSettings, env={"DATA_URL": "https://example.org/x.json"}).system_prompt is None


def test_default_data_ships_with_the_runtime_and_needs_no_network(context, tokenizer, monkeypatch):
    import selfllm_runtime

    def no_network(*args, **kwargs):
        raise AssertionError("the default data must not be downloaded")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    settings = context.settings(LoraSettings, env={"MAX_SAMPLES": "8"})
    assert settings.data == [] and settings.data_url is None
    paths, data, _ = prepare_data(context, tokenizer, settings)
    assert paths == [DEFAULT_DATA] and DEFAULT_DATA.is_relative_to(Path(selfllm_runtime.__file__).parent)
    assert data.records == 8 and len(read_records(DEFAULT_DATA)) > 1000  # upstream's full file, not a sample
    assert settings.run_dir(Path("/m/Qwen3-8B")).name == "Qwen3-8B-huanhuan"


def encode_as_the_family(tiny_recipe, recipe: str, conversation: list[dict], reply: dict,
                         thinking: bool = False) -> tuple[str, str, list[int], list[int]]:
    """One training example through the family's ChatTokenizer (its tiny model's tokenizer): (the masked prompt,
    the learned part, decoded; input_ids, labels)."""
    from transformers import AutoTokenizer

    context, folder = tiny_recipe(recipe)
    family = context.family
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = ChatTokenizer(tokenizer, thinking_kwargs(context, thinking), family.special_tokens.eos, 512,
                         closes_reply=family.template_closes_reply, reasoning=family.reasoning,
                         system_role=family.system_role)
    encoded = chat.encode(conversation, reply)
    ids, labels = encoded["input_ids"], encoded["labels"]
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return tokenizer.decode(ids[:first_learned]), tokenizer.decode(labels[first_learned:]), ids, labels


def test_gemma2_learns_with_the_system_prompt_in_its_first_user_turn(tiny_recipe):
    """Gemma-2's template has no system role (system_role: merge_into_first_user): the default data's
    SYSTEM_PROMPT goes into the first user turn of the prompt, the prompt stays masked, and the learned
    part is the reply and <end_of_turn>, as at inference time."""
    from selfllm_runtime.finetune.lora import load_tokenizer

    system = "现在你要扮演皇帝身边的女人--甄嬛"
    prompt, learned, ids, labels = encode_as_the_family(
        tiny_recipe, "gemma2/lora", [{"role": "system", "content": system}, {"role": "user", "content": "你是谁？"}],
        {"role": "assistant", "content": "我是甄嬛。"})
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first_learned]) and labels[first_learned:] == ids[first_learned:]
    assert prompt == f"<bos><start_of_turn>user\n{system}\n\n你是谁？<end_of_turn>\n<start_of_turn>model\n"
    assert learned == "我是甄嬛。<end_of_turn>"
    # the task's own path: the shipped data with the recipe's SYSTEM_PROMPT, through prepare_data
    context, folder = tiny_recipe("gemma2/lora")
    tokenizer = load_tokenizer(context, folder)
    settings = context.settings(LoraSettings, env={"MAX_SAMPLES": "4"})
    assert settings.system_prompt == system
    _, data, _ = prepare_data(context, tokenizer, settings)
    assert data.records == 4 and len(data.examples) == 4
    prompt = tokenizer.decode([t for t, label in zip(data.examples[0]["input_ids"], data.examples[0]["labels"])
                               if label == IGNORE_INDEX])
    assert prompt.startswith(f"<bos><start_of_turn>user\n{system}\n\n") and "<start_of_turn>system" not in prompt
    # a native family keeps ChatTokenizer's default: the template's own system turn
    assert ChatTokenizer(tokenizer, {}, context.family.special_tokens.eos).system_role == "native"


@pytest.mark.parametrize(("recipe", "prompt", "learned"), [
    # Phi-3's template writes eos_token after the last turn when no generation prompt follows; the reply is
    # learned up to its own <|end|>, and the template's system turn is kept (native).
    ("phi3/lora", "<|system|>\nS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n", "A<|end|>"),
    # Gemma 1: no system role (merged into the first user turn), <bos> written by the template.
    ("gemma/lora", "<bos><start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\n", "A<end_of_turn>"),
    # Hunyuan-A13B (thinking off, ENABLE_THINKING's default): no assistant tag, the reply follows the user turn's
    # <|extra_0|> and the pre-filled empty thinking, inside the checkpoint's answer markers (model.yaml reasoning)
    ("hunyuan-a13b/lora", "<|startoftext|>S<|extra_4|>Q<|extra_0|><think>\n\n</think>\n",
     "<answer>\nA\n</answer><|eos|>"),
    # GLM-4.5-Air: /nothink after the user turn, <think></think> pre-filled; the open reply learns <|endoftext|>
    ("glm4.5-air/lora", "[gMASK]<sop><|system|>\nS<|user|>\nQ/nothink<|assistant|>\n<think></think>", "\nA<|endoftext|>"),
])
def test_lora_learns_each_reply_up_to_the_family_end_of_turn(tiny_recipe, recipe, prompt, learned):
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    encoded = encode_as_the_family(tiny_recipe, recipe, conversation, {"role": "assistant", "content": "A"})
    assert encoded[:2] == (prompt, learned)


def test_hunyuan_learns_a_reply_with_its_reasoning_as_the_checkpoint_writes_it(tiny_recipe):
    """Thinking on, a data reply holding its reasoning: the answer markers go around what follows </think> only."""
    encoded = encode_as_the_family(tiny_recipe, "hunyuan-a13b/lora", [{"role": "user", "content": "Q"}],
                                   {"role": "assistant", "content": "<think>\nR\n</think>\nA"}, thinking=True)
    assert encoded[:2] == ("<|startoftext|>Q<|extra_0|>", "<think>\nR\n</think>\n<answer>\nA\n</answer><|eos|>")


@pytest.mark.parametrize(("model", "prompt", "learned"), [
    # Yi-6B-Chat's own template: a first system message's text bare before the first turn; the assistant
    # turn opened after every user turn, generation prompt or not.
    ("yi", "{system}<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n", "我是甄嬛。<|im_end|>"),
    # deepseek-llm-7b-chat's: plain-text turns; the generation prompt `Assistant:` has no space after it,
    # so the learned reply starts with one.
    ("deepseek-llm", "<｜begin▁of▁sentence｜>{system}\n\nUser: 你是谁？\n\nAssistant:",
     " 我是甄嬛。<｜end▁of▁sentence｜>")])
def test_system_text_and_reply_end_where_the_checkpoints_own_template_puts_them(tiny_recipe, model, prompt, learned):
    """Yi and DeepSeek-LLM (system_role native) keep their templates' own system handling: LoRA's masked
    prompt is what the engine renders, and the learned part is the reply up to the family's end token."""
    from transformers import AutoTokenizer

    from selfllm_runtime.chat_engine import ChatEngine

    context, folder = tiny_recipe(f"{model}/lora")
    family = context.family
    assert family.system_role == "native" and family.template_closes_reply
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = ChatTokenizer(tokenizer, thinking_kwargs(context, False), family.special_tokens.eos, 512,
                         closes_reply=family.template_closes_reply, reasoning=family.reasoning,
                         system_role=family.system_role)
    system = "现在你要扮演皇帝身边的女人--甄嬛"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "你是谁？"}]
    encoded = chat.encode(messages, {"role": "assistant", "content": "我是甄嬛。"})
    ids, labels = encoded["input_ids"], encoded["labels"]
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first_learned]) == prompt.format(system=system)
    assert tokenizer.decode(labels[first_learned:]) == learned
    assert ChatEngine(*tiny_recipe(f"{model}/fastapi")).format_prompt(messages) == prompt.format(system=system)


def test_a_checkpoint_of_another_lineage_ends_its_turns_with_its_own_token(tiny_recipe):
    """SmolLM2's case (tests/test_real_weights.py) on tiny models: a ChatML checkpoint (<|im_end|>) under a
    llama3.1 recipe, whose family ends turns with <|eot_id|>, a token this checkpoint lacks. LoRA learns the
    reply's end, and generation stops, on the checkpoint's own tokens (its tokenizer's eos, its
    generation_config's eos_token_id); where the checkpoint has the family's token, that one is used."""
    from transformers import AutoTokenizer, GenerationConfig

    from selfllm_runtime.chat_engine import end_of_turn, stop_token_ids
    from selfllm_runtime.finetune.lora import load_tokenizer

    llama, own = tiny_recipe("llama3.1/lora")
    _, chatml = tiny_recipe("qwen2.5/lora")
    tokenizer = load_tokenizer(llama, chatml)
    vocab = tokenizer.get_vocab()
    assert "<|eot_id|>" not in vocab and end_of_turn(tokenizer, llama.family) == "<|im_end|>"
    _, data, _ = prepare_data(llama, tokenizer, llama.settings(LoraSettings, env={"MAX_SAMPLES": "2"}))
    first = data.examples[0]
    assert first["labels"][-1] == vocab["<|im_end|>"]
    assert tokenizer.decode(first["input_ids"]).endswith("<|im_start|>assistant\n" + tokenizer.decode(
        [t for t in first["labels"] if t != IGNORE_INDEX]))
    generation = GenerationConfig.from_pretrained(chatml)  # eos_token_id: [<|im_end|>, <|endoftext|>]
    assert stop_token_ids(tokenizer, llama.family, generation) == sorted([vocab["<|im_end|>"], vocab["<|endoftext|>"]])
    assert stop_token_ids(tokenizer, llama.family) == [vocab["<|im_end|>"]]  # the tokenizer's eos alone
    assert end_of_turn(AutoTokenizer.from_pretrained(own), llama.family) == "<|eot_id|>"


def test_minicpm5_learns_the_reply_after_the_empty_think_block_of_its_prompt(tiny_recipe):
    """MiniCPM5's template writes `<think>\n\n</think>\n\n` after the generation prompt with thinking off but
    leaves it out of a finished turn. As in upstream's MiniCPM5 LoRA tutorial, the (masked) prompt keeps the
    block and the learned part is the reply and <|im_end|>; the whole example decodes to what it printed."""
    from transformers import AutoTokenizer

    context, folder = tiny_recipe("minicpm5/lora")
    family = context.family
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def chat(thinking: bool) -> ChatTokenizer:
        return ChatTokenizer(tokenizer, thinking_kwargs(context, thinking), family.special_tokens.eos, 512,
                             closes_reply=family.template_closes_reply, reasoning=family.reasoning,
                             system_role=family.system_role)

    system = "现在你要扮演皇帝身边的女人--甄嬛"
    question = "小姐，别的秀女都在求中选，唯有咱们小姐想被撂牌子，菩萨一定记得真真儿的——"
    reply = {"role": "assistant", "content": "嘘——都说许愿说破是不灵的。"}
    asked = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    encoded = chat(False).encode(asked, reply)
    assert tokenizer.decode(encoded["input_ids"]) == (
        f"<s><|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n嘘——都说许愿说破是不灵的。<|im_end|>")
    learned = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "嘘——都说许愿说破是不灵的。<|im_end|>"
    # a later turn: the earlier reply is in the prompt as the template renders it (no think block)
    later, answer = chat(False).render([*asked, reply, {"role": "user", "content": "你是谁？"}],
                                       {"role": "assistant", "content": "我是甄嬛。"})
    assert later.endswith("<|im_start|>assistant\n嘘——都说许愿说破是不灵的。<|im_end|>\n<|im_start|>user\n你是谁？"
                          "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n") and answer == "我是甄嬛。<|im_end|>"
    # thinking on: the prompt opens the block, the reply learns to close it first
    assert chat(True).render(asked, reply)[1] == "\n</think>\n\n嘘——都说许愿说破是不灵的。<|im_end|>"


def test_changed_default_data_is_refused(tmp_path):
    copy = tmp_path / "huanhuan.json"
    copy.write_bytes(DEFAULT_DATA.read_bytes().replace("甄嬛".encode(), "华妃".encode(), 1))
    assert default_data() == DEFAULT_DATA
    with pytest.raises(DataSourceError, match=r"has sha256 \w+, not 1bbe8b09.*set DATA_PATH"):
        default_data(copy)


def test_data_url_is_http_only_and_size_bounded(tmp_path):
    records = json.dumps([{"instruction": "你是谁？", "input": "", "output": "我是甄嬛。"}] * 40, ensure_ascii=False)
    site = StaticFiles({"/small.json": records.encode(), "/big.json": b"x" * 5000, "/stream.json": b"x" * 5000},
                       chunked={"/stream.json"})
    with serve(site) as url:
        fetched = fetch_data(f"{url}/small.json?token=1", tmp_path / "data", max_bytes=4096)
        assert fetched == tmp_path / "data" / "small.json" and fetched.read_text() == records
        for name in ("big.json", "stream.json"):  # refused by Content-Length, and while reading a chunked body
            with pytest.raises(DataSourceError, match=rf"DATA_URL={url}/{name} is larger than 4096 bytes.*DATA_PATH"):
                fetch_data(f"{url}/{name}", tmp_path / "data", max_bytes=4096)
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["small.json"]  # nothing partial left
    secret = tmp_path / "secret.json"
    secret.write_text(records)
    for refused in (secret.as_uri(), "ftp://127.0.0.1/x.json", "huanhuan.json"):
        with pytest.raises(DataSourceError, match=r"DATA_URL=.*only http:// and https://.*set DATA_PATH"):
            fetch_data(refused, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_unreachable_data_url_stops_start_with_one_line_and_status_2(tiny_model, tmp_path):
    """`selfllm start` as the image runs it (python -m selfllm_runtime), with DATA_URL on a closed port."""
    import selfllm_runtime

    url = closed_port_url() + "/huanhuan.json"
    env = {**os.environ, "RECIPE_DIR": str(RECIPE_DIR), "MODEL_PATH": str(tiny_model), "DATA_URL": url,
           "DATA_DIR": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(selfllm_runtime.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"selfllm lora: error: could not fetch DATA_URL={url} (URLError")
    assert last.endswith("set DATA_PATH to a mounted file instead")


@pytest.fixture(scope="session")
def trained(context, tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora-run")
    data = write_sample_data(work / "sample.json", 36)
    env = {"DATA_PATH": str(data), "OUTPUT_DIR": str(work / "out"), "RUN_NAME": "test", "MAX_STEPS": "20",
           "LEARNING_RATE": "5e-3", "BATCH_SIZE": "4", "GRAD_ACCUM": "1", "LOGGING_STEPS": "1",
           "SYSTEM_PROMPT": "现在你要扮演皇帝身边的女人--甄嬛"}
    return train(context, tiny_model, context.settings(LoraSettings, env=env))


@pytest.mark.parametrize("model", ["ernie4.5", "minicpm5", "gemma3", "gpt-oss"])
def test_newer_families_train_and_infer_through_the_runtime(model, tiny_recipe, tmp_path):
    """ERNIE-4.5 (Ernie4_5ForCausalLM), MiniCPM5 (LlamaForCausalLM, thinking-off template) and Gemma-3
    (Gemma3ForConditionalGeneration: LoRA on its language model only) on their tiny models: a few steps on the
    sample data, an adapter, and an answer with it."""
    context, folder = tiny_recipe(f"{model}/lora")
    env = {"DATA_PATH": str(write_sample_data(tmp_path / "sample.json", 12)), "OUTPUT_DIR": str(tmp_path / "out"),
           "RUN_NAME": "t", "MAX_STEPS": "6", "LEARNING_RATE": "5e-3", "BATCH_SIZE": "4", "GRAD_ACCUM": "1",
           "LOGGING_STEPS": "1", "SYSTEM_PROMPT": "现在你要扮演皇帝身边的女人--甄嬛"}
    done = train(context, folder, context.settings(LoraSettings, env=env))
    assert done["steps"] == 6 and len(done["losses"]) == 6 and all(loss > 0 for loss in done["losses"])
    assert (Path(done["adapter_dir"]) / "adapter_model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(Path(done["adapter_dir"]) / "adapter_model.safetensors"), framework="pt") as weights:
        adapted = {name.split(".lora_")[0] for name in weights.keys()}
    under = context.family.lora.modules_under
    assert adapted and all(under is None or f".{under}." in f".{name}" for name in adapted), sorted(adapted)
    if under:  # the vision tower has q_proj/k_proj/v_proj too: none of them got an adapter
        assert not any("vision" in name for name in adapted)
        assert {name.rsplit(".", 1)[-1] for name in adapted} == set(context.family.lora.target_modules)
    answer = infer(context, folder, Path(done["adapter_dir"]), "你是谁？", max_new_tokens=8, temperature=0)
    assert answer["adapter"] and 0 < answer["completion_tokens"] <= 8


def test_training_reduces_loss_and_saves_adapter(trained):
    assert trained["steps"] == 20 and len(trained["losses"]) == 20
    first, last = trained["losses"][:3], trained["losses"][-3:]
    assert sum(last) / 3 < sum(first) / 3 - 0.2, trained["losses"]  # ~6.57 → ~6.02 with seed 42
    adapter = Path(trained["adapter_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / RUN_INFO).read_text())["system_prompt"] == "现在你要扮演皇帝身边的女人--甄嬛"
    assert trained["train_tokens"] > 0 and trained["tokens_per_s"] > 0


def test_infer_with_adapter(context, tiny_model, trained):
    result = infer(context, tiny_model, Path(trained["adapter_dir"]), "你是谁？", max_new_tokens=16, temperature=0)
    assert result["adapter"] and result["completion_tokens"] > 0


def test_the_adapter_changes_what_the_model_says(context, tiny_model, trained):
    """The same greedy question, same system prompt: base model and base + adapter answer differently."""
    ask = dict(system_prompt="现在你要扮演皇帝身边的女人--甄嬛", enable_thinking=False, max_new_tokens=16, temperature=0)
    base = infer(context, tiny_model, None, "你是谁？", **ask)
    tuned = infer(context, tiny_model, Path(trained["adapter_dir"]), "你是谁？", **ask)
    assert base["adapter"] is None and tuned["adapter"]
    assert tuned["output"] != base["output"], f"the adapter changed nothing: {tuned['output']!r}"
    assert abs(tuned["prompt_logprob"] - base["prompt_logprob"]) > 1e-4  # the weights' fingerprint moved


def test_an_untrained_adapter_leaves_the_fingerprint_as_it_was(context, tiny_model, tmp_path):
    """What the smoke check relies on: LoRA's B starts at zero, so a fresh adapter is the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    untrained = tmp_path / "untrained"
    lora = context.family.lora
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules)).save_pretrained(untrained)
    base = infer(context, tiny_model, None, "你是谁？", max_new_tokens=4, temperature=0)
    fresh = infer(context, tiny_model, untrained, "你是谁？", max_new_tokens=4, temperature=0)
    assert fresh["prompt_logprob"] == base["prompt_logprob"]


def test_infer_samples_with_the_checkpoints_defaults(context, tiny_model, trained, tmp_path, monkeypatch):
    """No --temperature/--top-p: the checkpoint's generation_config decides, as on every other route."""
    import shutil

    from selfllm_runtime.chat_engine import ChatEngine, Completion

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text()) if (model / "generation_config.json").is_file() else {}
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0.6,
                                                              "top_p": 0.95}))
    seen = []

    def fake_generate(self, messages, params):
        seen.append(params)
        return Completion("ok", None, 1, 1, "stop")

    monkeypatch.setattr(ChatEngine, "generate", fake_generate)
    infer(context, model, Path(trained["adapter_dir"]), "你是谁？", max_new_tokens=4)
    assert (seen[0].temperature, seen[0].top_p) == (0.6, 0.95)


def test_merge_gives_loadable_model(context, tiny_model, trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    merge(context, tiny_model, Path(trained["adapter_dir"]), out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("你好，我是", return_tensors="pt")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                             trained["adapter_dir"]).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, with_adapter(**ids).logits, atol=1e-4)
        assert not torch.allclose(base(**ids).logits, merged(**ids).logits, atol=1e-3)  # the merge changed the weights
    result = infer(context, out, None, "你是谁？", max_new_tokens=8, temperature=0)
    assert result["adapter"] is None and result["completion_tokens"] > 0


def test_cli_sample_data_and_bad_data(context, tiny_model, tmp_path, capsys):
    from selfllm_runtime.cli import main

    out = tmp_path / "s.jsonl"
    assert main(["lora", "sample-data", str(out), "--count", "6"]) == 0
    assert len(out.read_text().splitlines()) == 6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"foo": 1}]))
    code = main(["lora", "--recipe", str(RECIPE_DIR), "train", "--model", str(tiny_model), "--data", str(bad),
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert f"{bad}: record 1: unknown format" in capsys.readouterr().err


def test_the_run_draws_its_curves_and_keeps_an_offline_swanlab_log(trained, tmp_path):
    """REPORT_TO=swanlab by default, offline: the smoke check's own reading of the run folder (run in the image
    there, on the host here) finds curves.png for the 20 steps with the reported losses and SwanLab's 20 points."""
    from selfllm_recipes.smoke.task_lora import run_files, verify_run_files

    files = run_files(trained["adapter_dir"])
    assert trained["report_to"] == "swanlab" and trained["swanlog"] == str(Path(trained["adapter_dir"]) / "swanlog")
    detail = verify_run_files(files, trained["steps"], trained["losses"], "loss")
    assert "4 curves over 20 steps" in detail and "20 loss points" in detail, detail
    assert list(files["curves"]["metrics"]) == ["loss", "learning_rate", "grad_norm", "train_tokens_per_second"]


def test_a_broken_picture_or_a_missing_swanlab_log_fails_the_smoke_check(trained):
    from selfllm_recipes.smoke.checks import SmokeFailure
    from selfllm_recipes.smoke.task_lora import run_files, verify_run_files

    files = run_files(trained["adapter_dir"])
    steps, losses = trained["steps"], trained["losses"]
    with pytest.raises(SmokeFailure, match="no SwanLab log"):
        verify_run_files({**files, "swanlab_points": None}, steps, losses, "loss")
    with pytest.raises(SmokeFailure, match="SwanLab log's train/loss"):
        verify_run_files({**files, "swanlab_points": files["swanlab_points"][:-1]}, steps, losses, "loss")
    with pytest.raises(SmokeFailure, match="drawn for step 20 .trained 21"):
        verify_run_files(files, 21, losses, "loss")
    import base64

    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        verify_run_files({**files, "png": base64.b64encode(b"not a png").decode()}, steps, losses, "loss")


def test_swanlab_local_mode_trains_with_the_network_off(context, tiny_model, tmp_path, monkeypatch):
    """SWANLAB_MODE=local: no login, no connection anywhere (every non-local socket connect raises)."""
    import socket

    tried: list = []
    real_connect = socket.socket.connect

    def no_network(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError(101, "Network is unreachable (test)")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    data = write_sample_data(tmp_path / "sample.json", 12)
    env = {"DATA_PATH": str(data), "OUTPUT_DIR": str(tmp_path / "out"), "RUN_NAME": "offline", "MAX_STEPS": "3",
           "BATCH_SIZE": "4", "GRAD_ACCUM": "1", "LOGGING_STEPS": "1"}
    done = train(context, tiny_model, context.settings(LoraSettings, env=env))
    assert not tried, tried
    from selfllm_recipes.smoke.task_lora import run_files

    assert [step for step, _ in run_files(done["adapter_dir"])["swanlab_points"]] == [1, 2, 3]


@pytest.mark.parametrize("recipe", ["qwen3-moe/lora", "glm4.7-flash/lora", "hunyuan-a13b/lora", "glm4.5-air/lora"])
def test_moe_lora_trains_the_fused_experts_and_merges(tiny_recipe, tmp_path, recipe):
    """Qwen3-MoE, GLM-4.7-Flash (MLA attention with a query LoRA, a dense layer 0, a shared expert): transformers 5
    keeps each layer's experts as 3-D parameters; model.yaml's lora.target_parameters puts LoRA on them (peft
    target_parameters): the adapter targets exactly model.yaml's modules and parameters (peft would move a
    gate_proj / up_proj / down_proj module name onto the experts), the attention and expert adapters move and the
    merged model equals base + adapter."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    context, folder = tiny_recipe(recipe)
    lora = context.family.lora
    assert lora.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    data = write_sample_data(tmp_path / "sample.json", 24)
    env = {"DATA_PATH": str(data), "OUTPUT_DIR": str(tmp_path / "out"), "RUN_NAME": "moe", "MAX_STEPS": "12",
           "LEARNING_RATE": "5e-3", "BATCH_SIZE": "4", "GRAD_ACCUM": "1", "LOGGING_STEPS": "1"}
    result = train(context, folder, context.settings(LoraSettings, env=env))
    first, last = result["losses"][:3], result["losses"][-3:]
    assert sum(last) / 3 < sum(first) / 3, result["losses"]
    weights = load_file(Path(result["adapter_dir"]) / "adapter_model.safetensors")
    experts = {name: tensor for name, tensor in weights.items() if "mlp.experts" in name}
    assert experts and any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in experts.items())
    moved = {name.split(".lora_B")[0].rsplit(".", 1)[-1] for name, tensor in weights.items()
             if "lora_B" in name and tensor.abs().sum() > 0}
    assert set(lora.target_modules) <= moved, moved
    config = json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert sorted(config["target_modules"]) == sorted(lora.target_modules)
    out = tmp_path / "merged"
    merge(context, folder, Path(result["adapter_dir"]), out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), result["adapter_dir"]).eval()
    ids = AutoTokenizer.from_pretrained(out)("你好，我是", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, with_adapter(**ids).logits, atol=1e-4)


def test_lora_on_parameters_refuses_dropout_by_name(tmp_path):
    """peft's LoRA on parameters has no dropout: a setting or a model.yaml asking for both is refused by name."""
    import shutil

    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.context import load_context
    from selfllm_runtime.metadata import MetadataError, load_family
    from selfllm_runtime.settings import SettingsError

    context = load_context(RECIPES_DIR / "qwen3-moe" / "lora")
    with pytest.raises(SettingsError, match="LORA_TARGET_PARAMETERS.*LORA_DROPOUT=0, not 0.1"):
        context.settings(LoraSettings, env={"LORA_DROPOUT": "0.1"})
    family = tmp_path / "qwen3-moe"
    shutil.copytree(RECIPES_DIR / "qwen3-moe", family, ignore=shutil.ignore_patterns("fastapi", "webdemo", "langchain", "lora", "vllm"))
    text = (family / "model.yaml").read_text(encoding="utf-8")
    (family / "model.yaml").write_text(text.replace("  dropout: 0 ", "  dropout: 0.1 "), encoding="utf-8")
    with pytest.raises(MetadataError, match="lora.dropout.*dropout 0"):
        load_family(family)


def test_two_processes_train_one_adapter_through_torchrun(tiny_model, tmp_path):
    """NPROC=2: `selfllm start` re-runs itself under torchrun (2 processes, gloo on CPU); both ranks end with the
    same adapter (DDP averages the gradients), only rank 0 writes it and the result line, the loss falls, and
    the merged model generates."""
    import os
    import re
    import subprocess
    import sys
    import time

    from selfllm_recipes.layout import RECIPES_DIR, REPO_ROOT
    from selfllm_runtime.context import load_context

    data = write_sample_data(tmp_path / "sample.json", 32)
    path = os.pathsep.join(filter(None, [str(REPO_ROOT / "runtime"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "RECIPE_DIR": str(RECIPES_DIR / "qwen3" / "lora"),
           "MODEL_PATH": str(tiny_model), "DATA_PATH": str(data), "OUTPUT_DIR": str(tmp_path / "out"),
           "RUN_NAME": "ddp", "MAX_STEPS": "12", "LEARNING_RATE": "5e-3", "BATCH_SIZE": "2", "GRAD_ACCUM": "1",
           "LOGGING_STEPS": "1", "NPROC": "2", "OMP_NUM_THREADS": "1", "SAVE_STEPS": "4"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], env=env, capture_output=True, text=True,
                          timeout=600)
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "2 processes through torchrun" in output
    ranks = dict(re.findall(r"selfllm: rank (\d)/2 adapter sha256 (\w+) last loss", output))
    assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"], ranks
    results = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("SELFLLM_RESULT ")]
    assert len(results) == 1  # rank 0 only
    result = results[0]
    assert "2 process(es): batch 2 per device × 1 accumulation steps × 2 = 4 examples per optimizer step" in output
    assert sum(result["losses"][-3:]) / 3 < sum(result["losses"][:3]) / 3, result["losses"]
    losses = re.findall(r"selfllm: rank (\d)/2 adapter sha256 \w+ last loss ([\d.]+)", output)
    print(f"2-process LoRA: {seconds:.1f} s, final losses {dict(losses)}, adapter {ranks['0']}")
    # Stopped after checkpoint-8 (the last checkpoint and the final adapter gone): rank 0 picks checkpoint-8, both
    # ranks load it, train the 4 remaining steps and end with the same adapter as the uninterrupted run.
    run = Path(result["adapter_dir"])
    shutil.rmtree(run / "checkpoint-12")
    for name in ("adapter_model.safetensors", "adapter_config.json", "selfllm_lora.json"):
        (run / name).unlink()
    again = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert again.stderr.count("RESUME=auto: resuming from checkpoint-8 at step 8") == 1  # said by rank 0 only
    assert dict(re.findall(r"selfllm: rank (\d)/2 adapter sha256 (\w+) last loss", again.stderr)) == ranks
    out = tmp_path / "merged"
    context = load_context(RECIPES_DIR / "qwen3" / "lora")
    merge(context, tiny_model, Path(result["adapter_dir"]), out)
    answer = infer(context, out, None, "你是谁？", max_new_tokens=6, temperature=0)
    assert answer["completion_tokens"] > 0


def test_nproc_is_checked_and_launches_torchrun():
    from selfllm_runtime.context import load_context
    from selfllm_runtime.settings import SettingsError
    from selfllm_runtime.finetune.commands import torchrun_argv

    from selfllm_recipes.layout import RECIPES_DIR

    context = load_context(RECIPES_DIR / "qwen3" / "lora")
    assert context.settings(LoraSettings, env={}).processes() == 1
    assert context.settings(LoraSettings, env={"NPROC": "4"}).processes() == 4
    with pytest.raises(SettingsError, match="NPROC"):
        context.settings(LoraSettings, env={"NPROC": "0"})
    with pytest.raises(SettingsError, match="FSDP"):
        context.settings(LoraSettings, env={"FSDP": "zero3"})
    assert torchrun_argv(2, "/py") == ["/py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                                       "--nproc-per-node", "2", "-m", "selfllm_runtime", "start"]


def test_gemma3_lora_trains_a_text_only_size_without_overrides(tiny_recipe, tmp_path):
    """Gemma-3 270m / 1b are Gemma3ForCausalLM (model.yaml `variants:`): no language_model module, so LoRA goes on
    the whole model's projections, picked from the checkpoint's config with no setting."""
    from selfllm_runtime.smoke_model import make_smoke_model

    context = tiny_recipe("gemma3/lora")[0]
    folder = make_smoke_model(context, tmp_path / "gemma3-1b-tiny", architecture="Gemma3ForCausalLM")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    env = {"DATA_PATH": str(write_sample_data(tmp_path / "sample.json", 8)), "OUTPUT_DIR": str(tmp_path / "out"),
           "RUN_NAME": "t", "MAX_STEPS": "3", "LEARNING_RATE": "5e-3", "BATCH_SIZE": "4", "GRAD_ACCUM": "1",
           "LOGGING_STEPS": "1"}
    done = train(context, folder, context.settings(LoraSettings, env=env))
    assert done["steps"] == 3 and done["architecture"] == "Gemma3ForCausalLM"
    from safetensors import safe_open

    with safe_open(str(Path(done["adapter_dir"]) / "adapter_model.safetensors"), framework="pt") as weights:
        adapted = {name.split(".lora_")[0] for name in weights.keys()}
    assert adapted and all(".model.layers." in name for name in adapted), sorted(adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(context.family.lora.target_modules)


def test_a_class_the_family_does_not_know_is_named_with_what_it_expects(tiny_recipe, tmp_path, caplog):
    """A checkpoint whose config names a class model.yaml doesn't list (here a text-only Gemma-3 renamed): one
    warning line at the start, and LoRA's failure to find model.language_model says which classes Gemma-3 comes
    in and what to set."""
    from selfllm_runtime.smoke_model import make_smoke_model

    context = tiny_recipe("gemma3/lora")[0]
    folder = make_smoke_model(context, tmp_path / "renamed", architecture="Gemma3ForCausalLM")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma3ForTextOnlyLM"]}))
    env = {"DATA_PATH": str(write_sample_data(tmp_path / "sample.json", 8)), "OUTPUT_DIR": str(tmp_path / "out"),
           "MAX_STEPS": "1"}
    with pytest.raises(ValueError) as caught:
        train(context, folder, context.settings(LoraSettings, env=env))
    expected = ("Gemma-3 expects Gemma3ForConditionalGeneration (4b, 12b, 27b; LoRA under model.language_model) or "
                "Gemma3ForCausalLM (270m, 1b; LoRA on the whole model)")
    assert "is a Gemma3ForTextOnlyLM checkpoint; " + expected in caplog.text
    message = str(caught.value)
    assert message.startswith("LoRA found none of q_proj,k_proj,v_proj,o_proj under model.language_model in ")
    assert expected in message and "LORA_TARGET_MODULES" in message and "variants:" in message


def test_smoke_model_refuses_a_class_the_family_lacks(tiny_recipe, tmp_path):
    from selfllm_runtime.smoke_model import make_smoke_model

    with pytest.raises(ValueError, match="Gemma-3 has no class LlamaForCausalLM: it has Gemma3ForConditionalGeneration"):
        make_smoke_model(tiny_recipe("gemma3/lora")[0], tmp_path / "x", architecture="LlamaForCausalLM")


def test_the_dashboard_serves_the_runs_swanlab_log_to_a_browser(trained, tmp_path):
    """`selfllm lora dashboard RUN` (swanlab watch over <run>/swanlog) on 127.0.0.1: a headless chromium opens the
    run's charts page, finds the loss chart drawn, and saves a screenshot."""
    import socket
    import time
    import urllib.request

    from playwright.sync_api import sync_playwright

    from selfllm_recipes.smoke.task_webdemo import CHROMIUM, CHROMIUM_ARGS
    from test_webdemo import need_chromium

    need_chromium()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_dir = Path(trained["adapter_dir"])
    log = (tmp_path / "dashboard.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "selfllm_runtime", "lora", "--recipe", str(RECIPE_DIR), "dashboard",
                               str(run_dir), "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/api/v1/project", timeout=5) as answer:
                    project = json.loads(answer.read())["data"]
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard never answered"
                time.sleep(0.5)
        assert project["name"] == "selfllm-lora" and [e["name"] for e in project["experiments"]] == [run_dir.name]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/experiment/{project['experiments'][0]['id']}", wait_until="networkidle")
            loss = page.locator("text=train/loss").first
            loss.wait_for(timeout=30_000)
            chart = page.locator(":has(> * :text-is('train/loss'))").last  # the card around the title
            assert "Step" in chart.inner_text() and chart.locator("canvas, svg").count() > 0
            shot = tmp_path / "qwen3-lora.dashboard.png"
            page.screenshot(path=str(shot))
            browser.close()
        assert shot.stat().st_size > 20_000
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert f"SwanLab dashboard of {run_dir / 'swanlog'} on http://127.0.0.1:{port}" in (
        tmp_path / "dashboard.log").read_text()
