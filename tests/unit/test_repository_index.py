"""Triton's model repository index (deployments.protocol.repository), pure."""

from __future__ import annotations

import pytest

from deployments.protocol import ProtocolError, model_control_refused, parse_index_request, repository_index


def test_an_empty_body_or_object_asks_for_every_model_and_ready_true_for_the_ready_ones():
    assert parse_index_request(b"") is False  # what tritonclient's get_model_repository_index sends
    assert parse_index_request(b"  \n") is False
    assert parse_index_request(b"{}") is False
    assert parse_index_request(b'{"ready": true}') is True
    assert parse_index_request(b'{"ready": false}') is False


@pytest.mark.parametrize("body, names", [
    (b"[1]", "JSON object"),
    (b'{"ready": "yes"}', "'ready' must be true or false"),
    (b'{"ready": 1}', "'ready' must be true or false"),
    (b'{"ready": true, "repository": "x"}', "unknown key(s) ['repository']"),
    (b"{not json", "JSON"),
])
def test_a_bad_index_request_is_a_400_naming_what_is_wrong(body, names):
    with pytest.raises(ProtocolError) as err:
        parse_index_request(body)
    assert err.value.status_code == 400 and names in err.value.message, err.value.message


def test_the_index_lists_models_by_name_with_their_state():
    ready = {"b": True, "a": False, "c": True}
    index = repository_index(ready, "1")
    assert [(e["name"], e["version"], e["state"]) for e in index] == [
        ("a", "1", "UNAVAILABLE"), ("b", "1", "READY"), ("c", "1", "READY")]
    assert index[0]["reason"] and index[1]["reason"] == ""
    assert [e["name"] for e in repository_index(ready, "1", ready_only=True)] == ["b", "c"]
    assert repository_index({}, "1") == []


def test_load_and_unload_are_refused_with_where_models_come_from():
    err = model_control_refused("resnet18", "unload")
    assert err.status_code == 400
    assert "unload model 'resnet18'" in err.message and "cluster.yaml" in err.message
