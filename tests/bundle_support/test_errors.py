"""The bad-input sentence behind MONAI's wrappers: found for the CLI, printed last under monai.bundle run."""

import subprocess
import sys

import pytest

from medssl3d.bundle_support import errors
from medssl3d.data.errors import InputError
from medssl3d.jobs.bundles import bundle_dir


def _wrapped(error: BaseException) -> RuntimeError:
    try:
        try:
            raise error
        except BaseException as e:
            raise RuntimeError("Failed to instantiate component 'x'") from e
    except RuntimeError as outer:
        return outer


def test_user_error_is_the_innermost_value_error():
    bad = InputError("/d/list.json", "cannot read the datalist")
    assert errors.user_error(_wrapped(bad)) is bad
    assert errors.user_error(bad) is bad
    assert errors.user_error(_wrapped(KeyError("x"))) is None
    assert errors.user_error(RuntimeError("no cause")) is None


def test_hook_prints_the_traceback_then_the_sentence_once(monkeypatch, capsys):
    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: printed.append(exc[1]))
    errors.report_user_errors_last()
    errors.report_user_errors_last()  # a second call does not wrap the hook again
    error = _wrapped(InputError("/d/list.json", "cannot read the datalist"))
    sys.excepthook(RuntimeError, error, error.__traceback__)
    assert printed == [error]  # the previous hook still prints the whole chain
    assert capsys.readouterr().err == "InputError: /d/list.json: cannot read the datalist\n"
    sys.excepthook(KeyError, KeyError("x"), None)  # not bad input: nothing added
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_pretraining_bundle_run_ends_with_the_sentence(tmp_path):
    missing = tmp_path / "missing.json"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--datalist", str(missing),
         "--output_dir", str(tmp_path / "runs"), "--ckpt_dir", str(tmp_path / "models")],
        capture_output=True, encoding="utf-8", cwd=bundle_dir("swin_ssl"), timeout=600,
    )
    assert done.returncode != 0 and "Traceback" in done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("InputError: ") and str(missing) in last, last
