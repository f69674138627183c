"""``deployments.local_handle``: an embedded replica called as the ingress calls a handle."""

from __future__ import annotations

import asyncio

import pytest

from deployments import local_handle
from deployments.config import ConfigError, parse_app_config
from deployments.local_handle import LocalHandle, build_embedded, local_model_id


class Replica:
    def __init__(self, *args):
        self.args = args

    async def infer(self, x, delay_s=0.0):
        seen = local_model_id()
        await asyncio.sleep(delay_s)
        return seen, x, local_model_id()  # the id before and after a wait

    def describe(self):
        return ("describe", local_model_id())

    def shutdown(self):
        pass


def test_methods_answer_as_awaitables_whether_async_or_not():
    handle = LocalHandle(Replica())

    async def main():
        return await handle.infer.remote(7), await handle.describe.remote()

    assert asyncio.run(main()) == ((None, 7, None), ("describe", None))


def test_each_call_sees_its_own_model_id_even_while_others_run():
    handle = LocalHandle(Replica())

    async def main():
        a = handle.options(multiplexed_model_id="a")
        b = handle.options(multiplexed_model_id="b")
        return await asyncio.gather(a.infer.remote(1, delay_s=0.02), b.infer.remote(2, delay_s=0.01),
                                    handle.infer.remote(3))

    assert asyncio.run(main()) == [("a", 1, "a"), ("b", 2, "b"), (None, 3, None)]
    assert local_model_id() is None  # nothing leaks out of a call


def test_transport_options_are_accepted_and_unknown_ones_named():
    handle = LocalHandle(Replica()).options(multiplexed_model_id="m")
    same = handle.options(_by_reference=False)
    assert asyncio.run(same.describe.remote()) == ("describe", "m")
    with pytest.raises(TypeError, match=r"\['timeout_s'\]"):
        handle.options(timeout_s=3)
    with pytest.raises(AttributeError):
        handle._private  # noqa: B018 - private attributes are not methods to call


def _spec(device: str = "auto") -> dict:
    model = {"name": "m", "source": {"architecture": "resnet18"}, "device": device}
    return {"name": "m", "cls": Replica, "args": ("model", "app"), "models": [model]}


def test_an_ingress_without_a_gpu_is_refused_with_what_to_set(monkeypatch):
    monkeypatch.setattr(local_handle, "_replica_has_gpu", lambda: False)
    with pytest.raises(ConfigError, match=r"num_gpus on EbbIngress.*device: cpu on \['m'\]"):
        build_embedded(_spec())
    assert build_embedded(_spec("cpu")).target.args == ("model", "app")  # a CPU model needs no GPU


def _args(**extra) -> dict:
    def model(name, group=None):
        m = {"name": name, "source": {"architecture": "resnet18"}}
        return {**m, "group": group} if group else m

    return {"models": [model("solo"), model("a", "g"), model("b", "g")], "groups": [{"name": "g"}], **extra}


def test_embed_names_a_model_without_a_group_or_a_group():
    assert parse_app_config(_args(embed="g")).embed == "g"
    assert parse_app_config(_args(embed="solo")).embed == "solo"
    with pytest.raises(ConfigError, match=r"embed: 'a' .*in group 'g': embed the group"):
        parse_app_config(_args(embed="a"))
    with pytest.raises(ConfigError, match=r"embed: 'nope' .*embeddable: \['solo', 'g'\]"):
        parse_app_config(_args(embed="nope"))


def test_the_embedded_deployment_is_not_bound_and_the_ingress_gets_its_spec():
    from deployments.app import bind

    app = bind(parse_app_config(_args(embed="g")))
    handles, _http, _ns, groups, embedded = app._bound_deployment.init_args
    assert sorted(handles) == ["solo"] and groups == {"a": "g", "b": "g"}
    assert embedded["name"] == "g" and [m["name"] for m in embedded["models"]] == ["a", "b"]
    assert embedded["cls"].__name__ == "GroupDeployment"
