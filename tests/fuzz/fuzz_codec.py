"""atheris fuzz target for the generated call decoders (gpu-proxy's side of every call).

Short run (the default suite does this): python -m tests.fuzz.fuzz_codec -atheris_runs=3000
Long run: python -m tests.fuzz.fuzz_codec -max_total_time=600
"""

import sys

import atheris

with atheris.instrument_imports(include=["idm", "tests.fuzz"]):
    from tests.fuzz.codec_target import decode_hostile_request


def test_one_input(data: bytes) -> None:
    decode_hostile_request(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
