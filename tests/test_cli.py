"""The `lora-inject` command: `inspect` agrees with `inject`, `merge` is exact, errors are one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import AutoModel, BertConfig, GPT2Config

import lora_inject as li
from lora_inject.cli import PROG, main, survey
from lora_inject.rule import find_rule

BERT = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=24, max_position_embeddings=16)
GPT2 = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)

INSPECT_CASES = [
    pytest.param(BERT, r"attention\.self\.(query|value)$", None, 2, None, id="bert-qv"),
    pytest.param(BERT, r"attention", r"layer\.1\.", 3, 6.0, id="bert-attention-exclude"),
    pytest.param(BERT, r"dense|word_embeddings", None, 4, None, id="bert-dense-embedding"),
    pytest.param(GPT2, r"attn|mlp", None, 2, 4.0, id="gpt2-conv1d"),
    pytest.param(GPT2, r"^h\.0\.", r"ln_", 5, None, id="gpt2-block0"),
]


def _save_config(config, tmp_path):
    config.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config, targets, exclude, r, alpha", INSPECT_CASES)
def test_inspect_agrees_with_inject(config, targets, exclude, r, alpha, tmp_path, capsys):
    # `inspect` builds the model on the meta device from the config; `inject` on a real one.
    assert main(["inspect", str(_save_config(config, tmp_path)), "--targets", targets, "--r", str(r)]
                + (["--exclude", exclude] if exclude else [])
                + (["--alpha", str(alpha)] if alpha is not None else [])) == 0
    printed = capsys.readouterr().out

    model = AutoModel.from_config(config)
    base = sum(p.numel() for p in model.parameters())
    li.inject(model, targets, exclude=exclude, r=r, alpha=alpha)
    expected = [(name, tuple(lora.view.shape), lora.lora_A["default"].numel() + lora.lora_B["default"].numel())
                for name, lora in li.named_loras(model)]
    added = sum(p.numel() for p in li.lora_parameters(model))

    with torch.device("meta"):
        s = survey(AutoModel.from_config(config), targets, exclude=exclude, r=r, alpha=alpha)
    assert [(f"{p}.{t}", shape, n) for p, _, t, shape, _, n in s.rows] == expected
    assert {row[4] for row in s.rows} == {r}
    assert (s.base_parameters, s.added) == (base, added)
    for name, shape, n in expected:
        module_path = name.rsplit(".", 1)[0]
        assert any(line.split()[:1] == [module_path] and line.split()[-1] == f"{n:,}"
                   for line in printed.splitlines()), name
    assert f"{added:,} LoRA parameters added to {base:,}" in printed
    assert f"trainable {100 * added / (base + added):.3f}%" in printed


@pytest.mark.parametrize("config, targets, exclude, r, alpha", INSPECT_CASES)
def test_inspect_lists_the_matched_modules_without_a_rule(config, targets, exclude, r, alpha):
    model = AutoModel.from_config(config)
    s = survey(model, targets, exclude=exclude, r=r, alpha=alpha)
    li.inject(model, targets, exclude=exclude, r=r)
    adapted = {name.rsplit(".", 1)[0] for name, _ in li.named_loras(model)}
    skipped = {path for path, _, _ in s.skipped}
    assert skipped.isdisjoint(adapted)
    assert all(find_rule(model.get_submodule(path)) is None for path in skipped)
    assert all("no rule for " + type_name in why for _, type_name, why in s.skipped)
    if targets == "attention":  # the BertAttention containers, their LayerNorms and Dropouts
        assert {"encoder.layer.0.attention", "encoder.layer.0.attention.output.LayerNorm"} <= skipped
        assert not any(p.startswith("encoder.layer.1.") for p in skipped)


def test_survey_leaves_the_model_as_it_was():
    model = AutoModel.from_config(BERT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    s = survey(model, "attention|intermediate", r=2)
    assert s.rows
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_inspect_reads_a_config_file_and_the_default_model(tmp_path, capsys):
    config_file = _save_config(BERT, tmp_path) / "config.json"
    assert main(["inspect", str(config_file), "--targets", r"self\.query$"]) == 0
    assert "Total: 2 tensors" in capsys.readouterr().out
    assert main(["inspect", "--targets", r"self\.query$"]) == 0  # all-MiniLM-L6-v2: 6 layers, 384 wide
    out = capsys.readouterr().out
    assert "Total: 6 tensors, 36,864 LoRA parameters added to 22,713,216" in out
    assert "encoder.layer.5.attention.self.query" in out


# -- merge -----------------------------------------------------------------------------------
def _outputs(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


MERGES = [
    pytest.param("lora_inject", torch.float32, id="ours-float32"),
    pytest.param("lora_inject", torch.float64, id="ours-float64"),
    pytest.param("peft", torch.float32, id="peft-float32"),
]


@pytest.mark.parametrize("fmt, dtype", MERGES)
def test_merge_writes_a_model_whose_outputs_equal_base_plus_adapter(fmt, dtype, tmp_path):
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    AutoModel.from_config(BERT).to(dtype).save_pretrained(base_dir)
    (base_dir / "vocab.txt").write_text("[PAD]\n")  # a tokenizer file, to be copied over
    trained = AutoModel.from_pretrained(base_dir)
    li.inject(trained, r"attention\.(self\.(query|value)|output\.dense)$", r=2, alpha=3)
    for _, lora in li.named_loras(trained):  # a trained adapter: B is not zero
        torch.nn.init.normal_(lora.lora_B["default"], std=0.5)
    li.save_adapter(trained, adapter_dir, format=fmt)

    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out_dir)]) == 0
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in out_dir.iterdir()}
    merged = AutoModel.from_pretrained(out_dir)
    assert merged.dtype == dtype
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())

    # What was written is exactly what remove(merge=True) gives in memory.
    in_memory = li.remove(li.load_adapter(AutoModel.from_pretrained(base_dir), adapter_dir), merge=True)
    expected = in_memory.state_dict()
    assert merged.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in merged.state_dict().items())

    # And its outputs are those of base + adapter, on the factored and on the materialised path.
    unmerged = li.load_adapter(AutoModel.from_pretrained(base_dir), adapter_dir)
    ids = torch.randint(0, BERT.vocab_size, (3, 7))
    torch.testing.assert_close(_outputs(merged, ids), _outputs(unmerged, ids))
    for _, lora in li.named_loras(unmerged):
        lora.factored = False
    torch.testing.assert_close(_outputs(merged, ids), _outputs(unmerged, ids))
    with li.disabled(unmerged):
        assert not torch.allclose(_outputs(merged, ids), _outputs(unmerged, ids))  # the adapter mattered


# -- errors ----------------------------------------------------------------------------------
def _dirs(tmp_path):
    base = tmp_path / "base"
    AutoModel.from_config(BERT).save_pretrained(base)
    li.save_adapter(li.inject(AutoModel.from_config(BERT), "query", r=2), tmp_path / "broken")
    weights = next((tmp_path / "broken").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    li.save_adapter(li.inject(AutoModel.from_config(GPT2), "attn", r=2), tmp_path / "other")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    return base


ERRORS = [
    pytest.param(["inspect", "{tmp}/nowhere", "--targets", "query"], 2, "MODEL must be a Hugging Face model",
                 id="inspect-no-model"),
    pytest.param(["inspect", "{base}", "--targets", "("], 1, "`targets` is not a valid regex", id="bad-regex"),
    pytest.param(["inspect", "{base}", "--targets", "zzz"], 1, "matched no module name", id="no-match"),
    pytest.param(["inspect", "{base}", "--targets", "LayerNorm"], 1, "no rule", id="only-no-rule"),
    pytest.param(["inspect", "{base}", "--targets", "query", "--r", "0"], 1, "`r` must be a positive int",
                 id="r-zero"),
    pytest.param(["inspect", "{base}", "--targets", "query", "--r", "two"], 2, "invalid int value",
                 id="r-not-int"),
    pytest.param(["inspect", "{base}"], 2, "required: --targets", id="no-targets"),
    pytest.param(["frobnicate"], 2, "invalid choice", id="unknown-command"),
    pytest.param(["merge", "--base", "{tmp}/nowhere", "--adapter", "{tmp}/empty", "--out", "{tmp}/o"], 2,
                 "--base must be a Hugging Face model directory", id="merge-no-base"),
    pytest.param(["merge", "--base", "{base}", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o"], 2,
                 "--adapter must be a directory", id="merge-no-adapter"),
    pytest.param(["merge", "--base", "{base}", "--adapter", "{tmp}/empty", "--out", "{tmp}/o"], 2,
                 "holds no adapter config", id="merge-empty-adapter"),
    pytest.param(["merge", "--base", "{base}", "--adapter", "{tmp}/broken", "--out", "{tmp}/o"], 1,
                 "load_adapter(): ", id="merge-corrupt-adapter"),
    pytest.param(["merge", "--base", "{base}", "--adapter", "{tmp}/other", "--out", "{tmp}/o"], 1,
                 "load_adapter(): ", id="merge-adapter-of-another-model"),
    pytest.param(["merge", "--base", "{base}", "--adapter", "{tmp}/broken", "--out", "{tmp}/full"], 2,
                 "exists and is not empty", id="merge-out-not-empty"),
    pytest.param(["merge", "--base", "{base}", "--adapter", "{tmp}/other", "--out", "{base}/merged"], 2,
                 "is inside the base model's directory", id="merge-out-inside-base"),
]


@pytest.mark.parametrize("argv, status, message", ERRORS)
def test_errors_are_one_line_and_a_nonzero_exit(argv, status, message, tmp_path, capsys):
    base = _dirs(tmp_path)
    argv = [a.format(tmp=tmp_path, base=base) for a in argv]
    capsys.readouterr()  # what the set-up printed
    assert main(argv) == status
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("lora-inject: error: ")]
    assert len(errors) == 1 and captured.err.rstrip("\n").endswith(errors[0]), captured.err
    assert message in errors[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_python_dash_m_runs_the_command(tmp_path):
    env = {**os.environ, "LORA_INJECT_TRACEBACK": ""}
    bad = subprocess.run([sys.executable, "-m", "lora_inject", "inspect", str(tmp_path / "nowhere"),
                          "--targets", "x"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("lora-inject: error: MODEL must be")
    assert "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "lora_inject", "--help"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0 and "inspect" in ok.stdout and "merge" in ok.stdout and "demo" in ok.stdout


def test_inspect_surveys_the_checkpoints_own_class_as_merge_loads_it(tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(GPT2).save_pretrained(tmp_path / "lm")  # architectures: ["GPT2LMHeadModel"]
    assert main(["inspect", str(tmp_path / "lm"), "--targets", r"c_attn|lm_head$"]) == 0
    out = capsys.readouterr().out  # the head is there, tied to the embedding: adapted once, for both
    assert re.search(r"lm_head\s+Linear\s+weight\s+50x16", out) and "transformer.wte" not in out
    assert main(["inspect", str(tmp_path / "lm"), "--targets", "c_attn"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and " h.0.attn" not in out


# -- one vocabulary for every command ------------------------------------------------------------
def _subparsers():
    from lora_inject.cli import _parser

    p = _parser()
    action = next(a for a in p._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return p, action.choices


def test_help_lists_every_command_with_an_example_that_parses():
    import shlex

    from lora_inject.cli import EXAMPLES

    p, commands = _subparsers()
    text = p.format_help()
    assert set(EXAMPLES) == set(commands)
    for name, sub in commands.items():
        example = next(line[line.index(PROG):] for line in text.splitlines() if f" {PROG} {name} " in line)
        argv = shlex.split(example)[1:]
        assert p.parse_args(argv).command == name, example  # the example is a valid command line
        assert example in sub.format_help()  # and the command's own --help shows it too


def test_the_documented_synopsis_names_every_option_of_every_command():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    synopsis = doc.split("```\n", 2)[1]
    _, commands = _subparsers()
    for name, sub in commands.items():
        line = next(line for line in synopsis.splitlines() if line.startswith(f"{PROG} {name}"))
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in line, f"the synopsis of `{name}` lacks {option}"


def test_commands_name_the_model_the_same_way():
    _, commands = _subparsers()
    for name in ("inspect", "merge"):
        base = next(a for a in commands[name]._actions if "--base" in a.option_strings)
        assert base.metavar == "MODEL" and "'default'" in base.help
    outs = {next(a for a in commands[n]._actions if "--out" in a.option_strings).metavar for n in ("merge", "demo")}
    assert outs == {"OUT_DIR"}


def test_inspect_takes_the_model_as_base_as_merge_does(tmp_path, capsys):
    model_dir = _save_config(BERT, tmp_path)
    assert main(["inspect", str(model_dir), "--targets", "query"]) == 0
    positional = capsys.readouterr().out
    assert main(["inspect", "--base", str(model_dir), "--targets", "query"]) == 0
    assert capsys.readouterr().out == positional
    assert main(["inspect", "--base", "default", "--targets", r"self\.query$"]) == 0
    assert "Total: 6 tensors" in capsys.readouterr().out
    assert main(["inspect", str(model_dir), "--base", str(model_dir), "--targets", "query"]) == 2
    assert "give MODEL once" in capsys.readouterr().err


@pytest.mark.slow
def test_merge_accepts_the_default_model_as_inspect_does(tmp_path):
    from lora_inject.demo import default_model_dir

    trained = li.inject(AutoModel.from_pretrained(default_model_dir()), r"self\.query$", r=2)
    for _, lora in li.named_loras(trained):
        torch.nn.init.normal_(lora.lora_B["default"], std=0.1)
    li.save_adapter(trained, tmp_path / "adapter")
    assert main(["merge", "--base", "default", "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModel.from_pretrained(tmp_path / "merged")
    expected = li.remove(trained, merge=True).state_dict()
    assert merged.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in merged.state_dict().items())
    assert (tmp_path / "merged" / "vocab.txt").is_file()  # the tokenizer came along
