"""atheris fuzz target for the host's ring consumer.

Short run (the default suite does this): python -m tests.fuzz.fuzz_ring -atheris_runs=3000
Long run: python -m tests.fuzz.fuzz_ring -max_total_time=600
"""

import sys

import atheris

with atheris.instrument_imports(include=["idm", "tests.fuzz"]):
    from tests.fuzz.ring_target import consume_hostile_ring


def test_one_input(data: bytes) -> None:
    consume_hostile_ring(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
