"""The Triton cases of the kernel tests, on CPU in Triton's interpreter.

The interpreter has to be on before ``triton`` is first imported, so these
cases run in a fresh pytest process with ``TRITON_INTERPRET=1``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter run itself")
def test_triton_cases_pass_under_the_interpreter():
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).parent), "-q", "-x", "-k", "triton and not interpreter", "-p", "no:cacheprovider"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]
