"""What a CPU benchmark's JSON says it ran on (common.device.describe_cpu): the name, the generation (a virtual
machine's name may be only "AMD EPYC", and Zen 4 and Zen 5 differ 2x in bf16 speed) and the bf16 instructions."""

from __future__ import annotations

from common import device

ZEN5 = ["processor\t: 0", "vendor_id\t: AuthenticAMD", "cpu family\t: 26", "model\t\t: 2",
        "model name\t: AMD EPYC", "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni"]
SAPPHIRE_RAPIDS = ["cpu family\t: 6", "model\t\t: 143", "model name\t: Intel(R) Xeon(R) Platinum 8480+",
                   "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"]
NO_BF16 = ["model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", "flags\t\t: avx2 fma"]


def test_the_generation_and_the_best_bf16_instructions_are_named() -> None:
    assert device.describe_cpu(ZEN5) == "AMD EPYC (family 26 model 2; avx512_bf16)"
    assert device.describe_cpu(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143; amx_bf16)"


def test_missing_fields_and_no_bf16_are_said_so() -> None:
    assert device.describe_cpu(NO_BF16) == "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz (no native bf16)"
    assert device.describe_cpu([]) == "unknown (no native bf16)"


def test_bf16_support_reads_whole_flags_not_substrings() -> None:
    assert device.cpu_bf16_support(["flags\t: avx512_bf16x amx_bf16_fake"]) == ""
    assert device.cpu_bf16_support(ZEN5) == "avx512_bf16"
