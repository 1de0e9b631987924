"""What the kernel tests share. tests/conftest.py has set TRITON_INTERPRET=1 (when there is no GPU)
before any kernel module is imported, so on CPU the kernels run in Triton's interpreter.

- ``@pytest.mark.bf16`` on a test or a ``pytest.param``: it runs a kernel in bfloat16, which the
  interpreter gets wrong (triton#11584), so it is skipped without CUDA.
- ``assert_rejects``: the bad-input check of every kernel's wrapper and torch reference.
- ``row_norm_bad_input``: the inputs both row-wise norms (layer_norm, rms_norm) reject, through
  their common ``check_row_norm_inputs``.
"""

import pytest
import torch

BF16_SKIP_REASON = "bf16 is wrong under the Triton interpreter (triton#11584)"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"bf16: runs a kernel in bfloat16; skipped without CUDA ({BF16_SKIP_REASON})"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("bf16") is not None and not torch.cuda.is_available():
        pytest.skip(BF16_SKIP_REASON)


@pytest.fixture
def assert_rejects():
    """assert_rejects(fn, args, changes, message): fn raises a ValueError matching message when called
    with args in which each named argument is replaced by changes[name](args), in order."""

    def check(fn, args, changes, message):
        args = dict(args)
        for name, change in changes.items():
            args[name] = change(args)
        with pytest.raises(ValueError, match=message):
            fn(**args)

    return check


# (changes for assert_rejects, message) against good arguments x and residual [3, 64], weight [64]
# (and bias [64]), all fp32, and eps.
ROW_NORM_INVALID = [
    pytest.param((dict(residual=lambda a: a["residual"][:2]), "residual shape"), id="residual_shape"),
    pytest.param((dict(residual=lambda a: a["residual"].half()), "residual dtype"), id="residual_dtype"),
    pytest.param(
        (dict(weight=lambda a: a["weight"][:32]), r"weight must have shape \[64\]"), id="weight_len"
    ),
    pytest.param((dict(weight=lambda a: a["weight"].view(1, 64)), "weight must be 1-D"), id="weight_2d"),
    pytest.param(
        (
            dict(
                x=lambda a: a["x"].half(),
                residual=lambda a: a["residual"].half(),
                weight=lambda a: a["weight"].bfloat16(),
            ),
            "weight dtype",
        ),
        id="weight_bf16_for_fp16",
    ),
    pytest.param((dict(x=lambda a: a["x"].long()), "x has dtype"), id="x_int"),
    pytest.param((dict(x=lambda a: a["x"].new_zeros(64, 3).t()), "last dim"), id="x_transposed"),
    pytest.param((dict(x=lambda a: a["x"].new_tensor(1.0)), "non-empty last"), id="x_scalar"),
    pytest.param((dict(x=lambda a: a["x"].new_zeros(3, 0)), "non-empty last"), id="x_hidden_0"),
    pytest.param((dict(eps=lambda a: -1.0), "eps"), id="eps_negative"),
    pytest.param((dict(eps=lambda a: torch.tensor(1e-6)), "eps"), id="eps_tensor"),
    pytest.param((dict(x=lambda a: [1.0]), "torch.Tensor"), id="x_list"),
]


@pytest.fixture(params=ROW_NORM_INVALID)
def row_norm_bad_input(request):
    """(changes, message) for assert_rejects, one bad input per test."""
    return request.param
