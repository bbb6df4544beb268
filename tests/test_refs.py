import pytest

from loom.errors import RefError
from loom.refs import parse_ref


def test_store_refs() -> None:
    r = parse_ref("sentiment")
    assert (r.kind, r.name, r.selector, r.tag) == ("store", "sentiment", None, "current")
    r = parse_ref("sentiment@v20260101-1200")
    assert (r.name, r.tag, str(r)) == ("sentiment", "v20260101-1200", "sentiment@v20260101-1200")
    assert parse_ref("sentiment@champion").tag == "champion"


def test_hub_and_path_refs() -> None:
    r = parse_ref("hf:mistralai/Mistral-7B-Instruct-v0.3")
    assert (r.kind, r.name, r.selector) == ("hub", "mistralai/Mistral-7B-Instruct-v0.3", None)
    assert parse_ref("hf:org/model@main").selector == "main"
    assert parse_ref("./models/x").kind == "path"
    assert parse_ref("/abs/dir").name == "/abs/dir"


@pytest.mark.parametrize(
    "bad", ["", "../etc", "a/../../b", "name@../x", "name@", "x y", "org/model", "-lead", "a@b@c"]
)
def test_bad_refs_are_refused_with_a_hint(bad: str) -> None:
    if bad.startswith(".."):
        assert parse_ref(bad).kind == "path"  # an explicit path is the user's choice, never a store name
        return
    with pytest.raises(RefError) as err:
        parse_ref(bad)
    assert "ref" in str(err.value) or "invalid" in str(err.value)
