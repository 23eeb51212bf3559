import json
import subprocess
import sys

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.generate import main

PROMPT = "The prompt phase and the token phase"


def test_json_output_is_the_engines_greedy_generation(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--max-tokens", "12", "--temperature", "0", "--ignore-eos",
                 "--json", PROMPT]) == 0
    result = json.loads(capsys.readouterr().out)
    engine = LLMEngine(EngineConfig(str(tiny_model_dir)))
    engine.add_request("x", engine.tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=12,
                                                                            ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert result["token_ids"] == [t for o in outs for t in o.token_ids]
    assert len(result["token_ids"]) == 12 and result["finish_reason"] == "length"
    assert result["text"] == "".join(o.text for o in outs)


def test_console_command_with_a_seed_repeats(tiny_model_dir, capsys):
    args = ["generate", "--model", str(tiny_model_dir), "--max-tokens", "8", "--temperature", "0.8", "--top-p", "0.9",
            "--seed", "5", "--json", PROMPT]
    process = subprocess.run([sys.executable, "-m", "phasesplit.cli", *args], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 0, process.stderr
    assert main(args[1:]) == 0
    assert json.loads(process.stdout) == json.loads(capsys.readouterr().out)
    assert 1 <= len(json.loads(process.stdout)["token_ids"]) <= 8


def test_bad_option_is_an_error_naming_it(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--temperature", "-1", PROMPT]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_dir), "--top-p", "0", PROMPT]) == 2
    assert "top_p" in capsys.readouterr().err
