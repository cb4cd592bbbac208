"""``hf-shedder --help`` and argument errors must not import torch or Transformers (seconds, hundreds of MB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "peft", "lm_eval")

# Runs the CLI as the console script does (sys.argv[0] is the hf-shedder script, then cli.main), then
# reports which heavy modules got imported.
_AS_SCRIPT = """
import json, sys
sys.argv[0] = "/some/venv/bin/hf-shedder"
from hf_shedder.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("argv", [
    ["--help"], ["prune", "--help"], ["recover", "--help"], ["eval", "--help"], ["bench", "--help"],
    ["prune", "--model", "m"],          # argument error: --steps and --out missing
    ["apply", "--export", "nonsense"],  # argument error: bad choice
    ["no-such-command"],
])
def test_help_and_argument_errors_import_no_torch(argv):
    res = subprocess.run([sys.executable, "-c", _AS_SCRIPT, json.dumps(argv)], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=120)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["code"] == (0 if "--help" in argv else 2), res.stderr
    assert report["heavy"] == [], f"{argv} imported {report['heavy']}"


def test_python_m_help_imports_no_torch():
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "hf_shedder", "--help"], capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "usage: hf-shedder" in res.stdout
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), imported & set(HEAVY)


def test_plain_import_still_registers_the_auto_classes():
    code = ("import hf_shedder, sys\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "print(CONFIG_MAPPING['hf_shedder'].__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert res.stdout.strip().splitlines()[-1] == "ShedderConfig", res.stderr[-2000:]
