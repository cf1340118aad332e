"""read_json_object: the one reader of JSON files that must hold an object (config.json,
lowrank_config.json, adapter_config.json), with one-line errors ending in the fix."""

import pytest

from lowrank.errors import LowrankError
from lowrank.json_files import read_json_object

DAMAGED = [
    ("not JSON", b"{ nope", "is not valid JSON"),
    ("empty", b"", "is not valid JSON"),
    ("not UTF-8", b'{"a": "\xff"}', "is not valid JSON"),
    ("a list", b"[1, 2]", "does not hold a JSON object"),
    ("a string", b'"text"', "does not hold a JSON object"),
    ("null", b"null", "does not hold a JSON object"),
]


@pytest.mark.parametrize(("case", "content", "words"), DAMAGED, ids=[row[0] for row in DAMAGED])
def test_damaged_files_are_one_line_errors_naming_the_file_and_the_fix(tmp_path, case, content, words):
    file = tmp_path / "config.json"
    file.write_bytes(content)
    with pytest.raises(LowrankError, match=words) as error:
        read_json_object(file, "save the model again")
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(file)) and message.endswith("; save the model again"), case


def test_an_object_is_returned_as_a_dict(tmp_path):
    file = tmp_path / "config.json"
    file.write_text('{"model_type": "llama", "layers": [1, 2], "nested": {"a": null}}')
    assert read_json_object(file, "unused") == {"model_type": "llama", "layers": [1, 2], "nested": {"a": None}}
